// Micro-benchmark (docs/perf, seventh day): the cost of a dependent kernel boundary (PDL, CUDA
// graph) against a grid-wide barrier inside one persistent kernel. Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/bnd scripts/gpu/boundary_bench.cu && /tmp/bnd
#include <cstdio>
#include <cuda_runtime.h>
#define CK(x) do{cudaError_t e=(x); if(e!=cudaSuccess){printf("%s:%d %s\n",__FILE__,__LINE__,cudaGetErrorString(e)); exit(1);} }while(0)
__device__ __forceinline__ void pdl_trigger(){ asm volatile("griddepcontrol.launch_dependents;"); }
__device__ __forceinline__ void pdl_wait(){ asm volatile("griddepcontrol.wait;" ::: "memory"); }
__global__ void k_chain(int* buf, int i){ pdl_trigger(); pdl_wait();
  __shared__ int v; if(threadIdx.x==0) v = ((volatile int*)buf)[i]; __syncthreads();
  if(blockIdx.x==0 && threadIdx.x==0) buf[i+1] = v + 1; }
// streaming kernel: each CTA reads bytes/gridDim of a big buffer, loads issued before the wait
__global__ void k_stream(const uint4* w, long long n16, int* buf, int i, float* sink){
  pdl_trigger();
  long long per = n16 / gridDim.x; const uint4* p = w + per*blockIdx.x;
  uint4 r[8]; unsigned acc=0;
  int nt = blockDim.x;
  for (int k=0;k<8;k++){ long long j = threadIdx.x + (long long)k*nt; r[k] = j<per? p[j]: make_uint4(0,0,0,0);} 
  pdl_wait();
  int v = ((volatile int*)buf)[i];
  for (int k=0;k<8;k++) acc ^= r[k].x ^ r[k].w;
  for (long long j = threadIdx.x + 8LL*nt; j < per; j += nt) { uint4 q = p[j]; acc ^= q.x ^ q.y; }
  if (acc == 0x12345678u) sink[0] = 1;
  __syncthreads();
  if(blockIdx.x==0 && threadIdx.x==0) buf[i+1] = v + 1; }
__device__ unsigned g_bar[2];
__device__ __forceinline__ void grid_barrier(unsigned nblocks, unsigned& gen){
  __syncthreads();
  if (threadIdx.x==0){
    unsigned target = (gen+1)*nblocks;
    unsigned old; asm volatile("atom.add.release.gpu.u32 %0,[%1],1;" : "=r"(old) : "l"(&g_bar[0]) : "memory");
    unsigned cur;
    do { asm volatile("ld.acquire.gpu.u32 %0,[%1];" : "=r"(cur) : "l"(&g_bar[0]) : "memory"); } while (cur < target);
  }
  gen++;
  __syncthreads();
}
__global__ void k_persist(int* buf, int n){
  unsigned gen=0;
  for (int i=0;i<n;i++){
    __shared__ int v; if(threadIdx.x==0) v = ((volatile int*)buf)[i]; __syncthreads();
    if(blockIdx.x==0 && threadIdx.x==0) buf[i+1] = v + 1;
    grid_barrier(gridDim.x, gen);
  }
}
template<class F> float time_graph(cudaStream_t s, F rec, int reps){
  cudaGraph_t g; cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal)); rec(); CK(cudaStreamEndCapture(s,&g));
  CK(cudaGraphInstantiate(&ge,g,0));
  CK(cudaGraphLaunch(ge,s)); CK(cudaStreamSynchronize(s));
  cudaEvent_t a,b; cudaEventCreate(&a); cudaEventCreate(&b);
  cudaEventRecord(a,s); for(int r=0;r<reps;r++) CK(cudaGraphLaunch(ge,s)); cudaEventRecord(b,s);
  CK(cudaStreamSynchronize(s)); float ms; cudaEventElapsedTime(&ms,a,b); return ms/reps;
}
template<class K, class... A> void launch(cudaStream_t s, bool pdl, int grid, int block, K k, A... args){
  cudaLaunchConfig_t c = {}; c.gridDim=grid; c.blockDim=block; c.stream=s;
  cudaLaunchAttribute at[1]; at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization; at[0].val.programmaticStreamSerializationAllowed = 1;
  c.attrs = at; c.numAttrs = pdl?1:0; CK(cudaLaunchKernelEx(&c, k, args...));
}
int main(){
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  int* buf; CK(cudaMalloc(&buf, 4*100000)); CK(cudaMemset(buf,0,4*100000));
  float* sink; CK(cudaMalloc(&sink, 64));
  const long long bytes = 36LL<<20; uint4* w; CK(cudaMalloc(&w, bytes*8)); CK(cudaMemset(w,1,bytes*8));
  const int N=1000;
  for (int pdl=0; pdl<2; pdl++) for (int grid : {1, 8, 132, 264, 1024}) for (int block : {128, 256, 1024}) {
    if (grid*block > 132*2048*2 && block==1024) continue;
    float ms = time_graph(s, [&]{ for(int i=0;i<N;i++) launch(s, pdl, grid, block, k_chain, buf, i); }, 5);
    printf("chain pdl=%d grid=%4d block=%4d: %.3f us per kernel\n", pdl, grid, block, ms*1000/N);
  }
  for (int grid : {132, 264}) for (int block : {128, 256, 512}) {
    void* gb; CK(cudaGetSymbolAddress(&gb, g_bar));
    float ms = time_graph(s, [&]{ CK(cudaMemsetAsync(gb,0,8,s)); launch(s,false,grid,block,k_persist,buf,N); }, 5);
    printf("persist grid=%d block=%d: %.3f us per barrier\n", grid, block, ms*1000/N);
  }
  // streaming: 35 MB products alone, and alternating with 1-CTA small kernels
  const int M=100; const long long n16 = (35LL<<20)/16;
  for (int pdl=0; pdl<2; pdl++) {
    float ms = time_graph(s, [&]{ for(int i=0;i<M;i++) launch(s,pdl,1024,128,k_stream,(const uint4*)(w + (i%8)*n16),n16,buf,i,sink); }, 5);
    printf("stream35MB pdl=%d: %.2f us each = %.0f GB/s\n", pdl, ms*1000/M, 35.0*1.048576e6*M/(ms*1e-3)/1e9);
    ms = time_graph(s, [&]{ for(int i=0;i<M;i++){ launch(s,pdl,1024,128,k_stream,(const uint4*)(w + (i%8)*n16),n16,buf,2*i,sink); launch(s,pdl,1,256,k_chain,buf,2*i+1);} }, 5);
    printf("stream35MB+small pdl=%d: %.2f us per pair\n", pdl, ms*1000/M);
    ms = time_graph(s, [&]{ for(int i=0;i<M;i++){ launch(s,pdl,1024,128,k_stream,(const uint4*)(w + (i%8)*n16),n16,buf,3*i,sink); launch(s,pdl,1,256,k_chain,buf,3*i+1); launch(s,pdl,64,256,k_chain,buf,3*i+2);} }, 5);
    printf("stream35MB+small+small pdl=%d: %.2f us per triple\n", pdl, ms*1000/M);
  }
  CK(cudaDeviceSynchronize());
  printf("done\n");
}
