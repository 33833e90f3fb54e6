// Micro-benchmark (docs/perf, eighth day): how fast TMA bulk copies requested before a PDL wait
// fill shared memory while a previous kernel still runs (a 1-block spin of 0 / 15 / 30 us),
// for several ring shapes, against register preloading. Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/tma scripts/gpu/tma_preload_bench.cu && /tmp/tma
#include <cstdio>
#include <cuda_runtime.h>
#define CK(x) do{cudaError_t e=(x); if(e!=cudaSuccess){printf("%s:%d %s\n",__FILE__,__LINE__,cudaGetErrorString(e)); exit(1);} }while(0)
typedef unsigned long long u64; typedef unsigned u32; typedef unsigned char u8;
__device__ __forceinline__ void pdl_trigger(){ asm volatile("griddepcontrol.launch_dependents;"); }
__device__ __forceinline__ void pdl_wait(){ asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ u64 gt(){ u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
__device__ __forceinline__ u32 sa(const void* p){ return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void tma_load(void* dst, const void* src, u32 bytes, u64* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sa(bar)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(sa(dst)), "l"(src), "r"(bytes), "r"(sa(bar)) : "memory"); }
__device__ __forceinline__ bool mbar_done(u64* bar, u32 parity) { u32 ok;
  asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}" : "=r"(ok) : "r"(sa(bar)), "r"(parity) : "memory"); return ok; }
__global__ void k_spin(int* buf, int i, int ns){ pdl_trigger(); pdl_wait(); u64 t0=gt(); while(gt()-t0 < (u64)ns){}
  if(threadIdx.x==0) buf[i+1]=buf[i]+1; }
// times[4*blk]: placed, wait returned, preloaded stages all in, end  (thread 0 of each block after syncthreads)
__global__ void k_tma(const u8* w, long long per_warp, int stage, int nbuf, int* buf, int i, u64* times, unsigned* sink, int pre_first){
  extern __shared__ __align__(128) u8 sm[];
  pdl_trigger(); u64 t0=gt();
  int warp=threadIdx.x>>5, lane=threadIdx.x&31, nw=blockDim.x>>5;
  u64* bars=(u64*)sm + warp*16; u8* ring = sm + 8*16*16 + (long long)warp*nbuf*stage;
  const u8* src = w + ((long long)blockIdx.x*nw + warp)*per_warp;
  int nst = per_warp / stage;
  if(lane==0){ for(int b=0;b<nbuf;b++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;"::"r"(sa(bars+b)));
    asm volatile("fence.mbarrier_init.release.cluster;":::"memory");
    for(int s=0;s<nbuf && s<nst;s++) tma_load(ring+(long long)s*stage, src+(long long)s*stage, stage, bars+s); }
  __syncwarp();
  u64 tp=0; if(pre_first){ for(int b=0;b<nbuf && b<nst;b++) while(!mbar_done(bars+b,0)){} tp=gt(); }
  pdl_wait(); u64 t1=gt();
  int v = ((volatile int*)buf)[i];
  unsigned acc=0; u64 t2=0;
  for(int s=0;s<nst;s++){ int b=s%nbuf; while(!mbar_done(bars+b,(s/nbuf)&1)){}
    if(s==nbuf-1) t2=pre_first? tp: gt();
    const uint4* p=(const uint4*)(ring+(long long)b*stage);
    for(int j=lane;j<stage/16;j+=32){ uint4 q=p[j]; acc^=q.x^q.w; }
    __syncwarp();
    if(lane==0 && s+nbuf<nst){ asm volatile("fence.proxy.async.shared::cta;":::"memory"); tma_load(ring+(long long)b*stage, src+(long long)(s+nbuf)*stage, stage, bars+b);} }
  if(acc==0x1234567u) sink[0]=acc;
  __shared__ u64 tmax[3]; if(threadIdx.x==0){tmax[0]=0;tmax[1]=0;tmax[2]=0;} __syncthreads();
  if(lane==0){ atomicMax(&tmax[0],t2); } u64 t3=gt(); if(lane==0) atomicMax(&tmax[1],t3); __syncthreads();
  if(threadIdx.x==0){ times[4*blockIdx.x]=t0; times[4*blockIdx.x+1]=t1; times[4*blockIdx.x+2]=tmax[0]; times[4*blockIdx.x+3]=tmax[1]; if(blockIdx.x==0) buf[i+1]=v+1; }
}
// register preload streaming (like mv regs)
__device__ __forceinline__ uint4 ldv(const uint4* p){ uint4 v; asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p)); return v; }
__global__ void k_regs(const uint4* w, long long per_blk16, int* buf, int i, u64* times, unsigned* sink){
  pdl_trigger(); u64 t0=gt(); const uint4* p=w+per_blk16*blockIdx.x; uint4 r[16]; unsigned acc=0;
  for(int k=0;k<16;k++){ long long j=threadIdx.x+(long long)k*blockDim.x; r[k]= j<per_blk16? ldv(p+j): make_uint4(0,0,0,0);} 
  pdl_wait(); u64 t1=gt(); int v=((volatile int*)buf)[i];
  for(int k=0;k<16;k++) acc^=r[k].x^r[k].w;
  for(long long j=threadIdx.x+16LL*blockDim.x;j<per_blk16;j+=blockDim.x){uint4 q=__ldg(p+j); acc^=q.x^q.y;}
  if(acc==0x1234567u) sink[0]=acc; __syncthreads(); u64 t3=gt();
  if(threadIdx.x==0){ times[4*blockIdx.x]=t0; times[4*blockIdx.x+1]=t1; times[4*blockIdx.x+2]=0; times[4*blockIdx.x+3]=t3; if(blockIdx.x==0) buf[i+1]=v+1; }
}
template<class K, class... A> void launch(cudaStream_t s, bool pdl, int grid, int block, int smem, K k, A... args){
  cudaLaunchConfig_t c = {}; c.gridDim=grid; c.blockDim=block; c.stream=s; c.dynamicSmemBytes=smem;
  cudaLaunchAttribute at[1]; at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization; at[0].val.programmaticStreamSerializationAllowed = 1;
  c.attrs = at; c.numAttrs = pdl?1:0; CK(cudaLaunchKernelEx(&c, k, args...)); }
int main(){
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  int* buf; CK(cudaMalloc(&buf, 4*1000)); CK(cudaMemset(buf,0,4000)); unsigned* sink; CK(cudaMalloc(&sink,64));
  const long long MB=36LL<<20; u8* w; CK(cudaMalloc(&w, MB*8)); CK(cudaMemset(w,1,MB*8));
  u64* times; CK(cudaMalloc(&times, 8*4*2048)); u64 h[4*2048];
  CK(cudaFuncSetAttribute(k_tma, cudaFuncAttributeMaxDynamicSharedMemorySize, 220*1024));
  const long long bytes = 35LL<<20; // per product
  struct C{int stage,nbuf,warps,blocks,pre;}; 
  C cs[]={{4352,5,8,128,0},{4352,5,8,128,1},{4096,1,8,128,1},{4096,4,8,128,1},{16384,1,8,128,1},{16384,1,8,128,0},{32768,1,4,128,1},{8192,2,8,128,1},{4096,6,8,128,0},{4096,6,8,128,1},{0,0,0,1024,0}};
  for (int spin : {0, 15000, 30000}) for (C c : cs) {
    int stage=c.stage, nbuf=c.nbuf, warps=c.warps, blocks=c.blocks; bool regs = stage==0;
    double sum[4]={0,0,0,0}; int R=20; double pre_mb=0;
    for(int r=0;r<R;r++){
      const u8* wp = w + (r%8)*MB;
      launch(s,false,1,32,0,k_spin,buf,0,spin);
      if(!regs){ long long per_warp = bytes/(blocks*warps); per_warp = per_warp/stage*stage; int smem=8*16*16+warps*nbuf*stage;
        pre_mb = (double)blocks*warps*nbuf*stage/1048576.0;
        launch(s,true,blocks,warps*32,smem,k_tma,wp,per_warp,stage,nbuf,buf,1,times,sink,c.pre); }
      else { launch(s,true,1024,128,0,k_regs,(const uint4*)wp,(bytes/16)/1024,buf,1,times,sink); pre_mb=33.5; }
      CK(cudaStreamSynchronize(s)); CK(cudaMemcpy(h,times,8*4*blocks,cudaMemcpyDeviceToHost));
      u64 mn0=~0ull, mx0=0, mn1=~0ull, mx2=0, mx3=0;
      for(int b=0;b<blocks;b++){ mn0=min(mn0,h[4*b]); mx0=max(mx0,h[4*b]); mn1=min(mn1,h[4*b+1]); mx2=max(mx2,h[4*b+2]); mx3=max(mx3,h[4*b+3]); }
      if(r>=4){ sum[0]+= (mx0-mn0); sum[1]+= (mn1-mn0); sum[2]+= regs?0:(double)mx2-(double)mn0; sum[3]+=(mx3-mn1);} }
    int n=R-4;
    printf("spin %5d stage %5d nbuf %2d warps %d pre_first %d (%.1f MB ring): spread %.2f, placed->wait %.2f, placed->preloaded %.2f us (%.2f TB/s), wait->end %.2f us\n", spin, stage, nbuf, warps, c.pre, pre_mb, sum[0]/n/1e3, sum[1]/n/1e3, sum[2]/n/1e3, pre_mb*1.048576e6/(sum[2]/n)/1e3, sum[3]/n/1e3);
  }
  printf("done\n");
}
