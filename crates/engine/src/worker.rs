//! One model, one worker: a dedicated thread owns the [`Generator`] and serves requests
//! strictly one at a time in FIFO order (spec server.md §5.2). Front ends talk to it
//! through a cheap, cloneable [`WorkerHandle`]; events are delivered through a sink
//! closure that runs on the worker thread, so any runtime (tokio, threads) can consume them.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;

use crate::request::{Directive, EngineFinish, GenerationEvent, GenerationRequest, Usage};

/// A failure inside the generator (backend error, bad prompt, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GenerateError(pub String);

/// Errors of the worker itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    #[error("inference worker has stopped")]
    Gone,
    #[error("cannot start inference worker: {0}")]
    Spawn(String),
}

pub type Result<T> = std::result::Result<T, WorkerError>;

/// How a generation ended, returned by [`Generator::generate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub finish: EngineFinish,
    pub usage: Usage,
}

/// Anything that turns a prompt into tokens: the real model-backed engine, or the
/// scripted generator used for client integration testing.
pub trait Generator: Send {
    /// Serve one request. Emit `Prefill`/`Started`/`Token` events through `emit` (never
    /// the terminal ones: the worker sends `Finished`/`Error` from the returned value).
    /// Stop as soon as `emit` answers [`Directive::Stop`] or the cancel token is set.
    fn generate(
        &mut self,
        req: &GenerationRequest,
        emit: &mut dyn FnMut(GenerationEvent) -> Directive,
    ) -> std::result::Result<Outcome, GenerateError>;

    /// Context size in tokens (prompt + generation must fit).
    fn context_size(&self) -> u32;
}

/// Receives every event of one request, on the worker thread.
pub type EventSink = Box<dyn FnMut(GenerationEvent) -> Directive + Send>;

struct Job {
    request: GenerationRequest,
    sink: EventSink,
}

/// Cloneable handle to the worker thread.
#[derive(Clone)]
pub struct WorkerHandle {
    jobs: mpsc::Sender<Job>,
    queued: Arc<AtomicUsize>,
    context_size: u32,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .field("context_size", &self.context_size)
            .finish()
    }
}

impl WorkerHandle {
    /// Start the worker thread; it runs until every handle is dropped.
    pub fn spawn(generator: Box<dyn Generator>) -> Result<Self> {
        let context_size = generator.context_size();
        let (jobs, rx) = mpsc::channel::<Job>();
        let queued = Arc::new(AtomicUsize::new(0));
        let queued_worker = Arc::clone(&queued);
        thread::Builder::new()
            .name("ds4-inference".into())
            .spawn(move || run_worker(generator, rx, queued_worker))
            .map_err(|e| WorkerError::Spawn(e.to_string()))?;
        Ok(Self {
            jobs,
            queued,
            context_size,
        })
    }

    /// Queue a request. Its events (ending with exactly one terminal event) go to `sink`.
    pub fn submit(&self, request: GenerationRequest, sink: EventSink) -> Result<()> {
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.jobs.send(Job { request, sink }).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            WorkerError::Gone
        })
    }

    /// Requests waiting or running.
    pub fn pending(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    pub fn context_size(&self) -> u32 {
        self.context_size
    }
}

fn run_worker(
    mut generator: Box<dyn Generator>,
    rx: mpsc::Receiver<Job>,
    queued: Arc<AtomicUsize>,
) {
    while let Ok(Job { request, mut sink }) = rx.recv() {
        let terminal = if request.cancel.is_cancelled() {
            // The client left while queued: skip the prefill entirely.
            GenerationEvent::Finished {
                reason: EngineFinish::Cancelled,
                usage: Usage::default(),
            }
        } else {
            run_one(generator.as_mut(), &request, &mut sink)
        };
        // The job is done before its terminal event goes out, so whoever sees that event
        // also sees the queue without it.
        queued.fetch_sub(1, Ordering::AcqRel);
        // A sink that panics must not take the worker down either.
        let _ = catch_unwind(AssertUnwindSafe(|| sink(terminal)));
    }
    tracing::debug!("inference worker exiting: all handles dropped");
}

fn run_one(
    generator: &mut dyn Generator,
    request: &GenerationRequest,
    sink: &mut EventSink,
) -> GenerationEvent {
    let cancel = request.cancel.clone();
    let mut emit = |event: GenerationEvent| -> Directive {
        if event.is_terminal() {
            // Terminal events are the worker's job; ignore a generator that sends one.
            return Directive::Continue;
        }
        let directive = sink(event);
        if directive == Directive::Stop {
            cancel.cancel();
        }
        directive
    };
    match catch_unwind(AssertUnwindSafe(|| generator.generate(request, &mut emit))) {
        Ok(Ok(outcome)) => GenerationEvent::Finished {
            reason: outcome.finish,
            usage: outcome.usage,
        },
        Ok(Err(e)) => GenerationEvent::Error { message: e.0 },
        Err(_) => {
            tracing::error!("generator panicked; request failed, worker keeps serving");
            GenerationEvent::Error {
                message: "internal generator error".into(),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::request::{CancelToken, SamplingParams};
    use std::sync::Mutex;
    use std::time::Duration;

    /// Emits the prompt tokens back, one per event; panics on an empty prompt.
    struct Echo;
    impl Generator for Echo {
        fn generate(
            &mut self,
            req: &GenerationRequest,
            emit: &mut dyn FnMut(GenerationEvent) -> Directive,
        ) -> std::result::Result<Outcome, GenerateError> {
            assert!(!req.prompt_tokens.is_empty(), "empty prompt");
            if req.prompt_tokens[0] == 999 {
                return Err(GenerateError("backend failed".into()));
            }
            emit(GenerationEvent::Started {
                prompt_tokens: req.prompt_tokens.len() as u32,
                cached_tokens: 0,
            });
            let mut n = 0;
            for &id in &req.prompt_tokens {
                if req.cancel.is_cancelled() {
                    return Ok(Outcome {
                        finish: EngineFinish::Cancelled,
                        usage: Usage::default(),
                    });
                }
                n += 1;
                if emit(GenerationEvent::Token {
                    id,
                    bytes: vec![id as u8],
                }) == Directive::Stop
                {
                    return Ok(Outcome {
                        finish: EngineFinish::Stopped,
                        usage: Usage {
                            completion_tokens: n,
                            ..Default::default()
                        },
                    });
                }
            }
            Ok(Outcome {
                finish: EngineFinish::Eos,
                usage: Usage {
                    completion_tokens: n,
                    ..Default::default()
                },
            })
        }
        fn context_size(&self) -> u32 {
            64
        }
    }

    fn request(tokens: Vec<u32>) -> GenerationRequest {
        GenerationRequest {
            prompt_tokens: tokens,
            prompt_text: String::new(),
            sampling: SamplingParams::default(),
            max_tokens: 10,
            greedy_dsml: false,
            cancel: CancelToken::new(),
        }
    }

    fn collect(
        handle: &WorkerHandle,
        req: GenerationRequest,
        stop_after: Option<usize>,
    ) -> Vec<GenerationEvent> {
        let (tx, rx) = mpsc::channel();
        let mut seen = 0usize;
        handle
            .submit(
                req,
                Box::new(move |ev| {
                    let terminal = ev.is_terminal();
                    if matches!(ev, GenerationEvent::Token { .. }) {
                        seen += 1;
                    }
                    let _ = tx.send(ev);
                    if !terminal && stop_after.is_some_and(|n| seen >= n) {
                        Directive::Stop
                    } else {
                        Directive::Continue
                    }
                }),
            )
            .unwrap();
        let mut out = Vec::new();
        loop {
            let ev = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            let done = ev.is_terminal();
            out.push(ev);
            if done {
                return out;
            }
        }
    }

    #[test]
    fn serves_requests_and_ends_with_one_terminal_event() {
        let h = WorkerHandle::spawn(Box::new(Echo)).unwrap();
        let evs = collect(&h, request(vec![1, 2, 3]), None);
        assert_eq!(evs.len(), 5);
        assert!(
            matches!(evs[4], GenerationEvent::Finished { reason: EngineFinish::Eos, usage } if usage.completion_tokens == 3)
        );
        assert_eq!(h.context_size(), 64);
    }

    #[test]
    fn stop_directive_stops_and_error_and_panic_keep_the_worker_alive() {
        let h = WorkerHandle::spawn(Box::new(Echo)).unwrap();
        let evs = collect(&h, request(vec![1, 2, 3, 4]), Some(2));
        assert!(matches!(
            evs.last(),
            Some(GenerationEvent::Finished {
                reason: EngineFinish::Stopped,
                ..
            })
        ));
        let evs = collect(&h, request(vec![999]), None);
        assert_eq!(
            evs,
            vec![GenerationEvent::Error {
                message: "backend failed".into()
            }]
        );
        let evs = collect(&h, request(vec![]), None);
        assert!(matches!(evs[0], GenerationEvent::Error { .. }));
        let evs = collect(&h, request(vec![7]), None);
        assert!(matches!(
            evs.last(),
            Some(GenerationEvent::Finished {
                reason: EngineFinish::Eos,
                ..
            })
        ));
        assert_eq!(h.pending(), 0);
    }

    #[test]
    fn cancelled_before_start_skips_generation_and_fifo_order_holds() {
        let h = WorkerHandle::spawn(Box::new(Echo)).unwrap();
        let req = request(vec![1]);
        req.cancel.cancel();
        let evs = collect(&h, req, None);
        assert_eq!(evs.len(), 1);
        assert!(matches!(
            evs[0],
            GenerationEvent::Finished {
                reason: EngineFinish::Cancelled,
                ..
            }
        ));

        let order = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        for i in 0..8u32 {
            let order = Arc::clone(&order);
            let tx = tx.clone();
            h.submit(
                request(vec![i + 1]),
                Box::new(move |ev| {
                    if let GenerationEvent::Token { id, .. } = ev {
                        order.lock().unwrap().push(id);
                    }
                    if ev.is_terminal() {
                        let _ = tx.send(());
                    }
                    Directive::Continue
                }),
            )
            .unwrap();
        }
        for _ in 0..8 {
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (1..=8).collect::<Vec<_>>());
    }
}
