//! One scheduler thread per loaded model: it owns the plugin model (the only thread that touches
//! it), admits requests from a channel, runs one plugin step per iteration over every running
//! sequence (prefill for newcomers, one decode token for the others), detokenizes and streams the
//! results. Sequences join and leave between steps; a sequence whose client went away is released
//! before the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use llm_abi::{SeqInput, SeqOutput};
use llm_proto::v1::{Completion, FinishReason, GenerateResponse, TokenLogprobs, TopLogprob};
use tokio::sync::{mpsc as tmpsc, oneshot};
use tonic::Status;

use crate::detok::StreamDecoder;
use crate::error::ServerError;
use crate::plugin::PluginModel;
use crate::request::ValidParams;
use crate::tokenizer::TextModel;

pub type ResponseTx = tmpsc::UnboundedSender<Result<GenerateResponse, Status>>;

/// A tokenized request, ready to run.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: ValidParams,
    pub tx: ResponseTx,
    /// When the server received the request (TTFT and queue time count from here).
    pub received: Instant,
}

enum Command {
    Generate(Job),
    /// Stop: fail running requests with UNAVAILABLE, destroy the model, then acknowledge.
    Shutdown(oneshot::Sender<()>),
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Positions per sequence (prompt + generated).
    pub max_context: usize,
}

/// Handle to a model's scheduler thread.
pub struct Scheduler {
    tx: mpsc::Sender<Command>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

impl Scheduler {
    pub fn start(
        name: &str,
        model: PluginModel,
        text: Arc<TextModel>,
        cfg: SchedulerConfig,
    ) -> Scheduler {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("sched-{name}"))
            .spawn(move || Loop::new(model, text, cfg).run(rx))
            .expect("spawn scheduler thread");
        Scheduler {
            tx,
            thread: std::sync::Mutex::new(Some(thread)),
        }
    }

    pub fn submit(&self, job: Job) -> Result<(), ServerError> {
        self.tx
            .send(Command::Generate(job))
            .map_err(|_| ServerError::Unavailable("the model is being unloaded".into()))
    }

    /// Stop the thread and wait until the model is destroyed. Requests submitted afterwards get
    /// UNAVAILABLE.
    pub async fn shutdown(&self) {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(ack_tx)).is_ok() {
            let _ = ack_rx.await;
        }
        let thread = self.thread.lock().expect("scheduler lock").take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

struct Seq {
    id: u64,
    job: Job,
    decoder: StreamDecoder,
    /// Prompt tokens not yet fed.
    prefilled: bool,
    last_token: u32,
    generated: u32,
    started: Option<Instant>,
    first_token: Option<Instant>,
}

struct Loop {
    model: PluginModel,
    text: Arc<TextModel>,
    cfg: SchedulerConfig,
    waiting: VecDeque<Job>,
    running: Vec<Seq>,
}

impl Loop {
    fn new(model: PluginModel, text: Arc<TextModel>, cfg: SchedulerConfig) -> Loop {
        Loop {
            model,
            text,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            // Block only when there is nothing to do.
            let cmd = if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else {
                rx.try_recv().ok()
            };
            if let Some(cmd) = cmd {
                match cmd {
                    Command::Generate(job) => self.waiting.push_back(job),
                    Command::Shutdown(ack) => {
                        const WHY: &str = "the model was unloaded";
                        self.fail_all(WHY);
                        // Destroy the model (weights, caches) before acknowledging.
                        drop(self);
                        // Anything that raced in after the shutdown command is answered too;
                        // later submits fail at send once `rx` is dropped.
                        while let Ok(cmd) = rx.try_recv() {
                            match cmd {
                                Command::Generate(job) => {
                                    let _ = job.tx.send(Err(Status::unavailable(WHY)));
                                }
                                Command::Shutdown(a) => {
                                    let _ = a.send(());
                                }
                            }
                        }
                        let _ = ack.send(());
                        return;
                    }
                }
                // Drain everything already queued before stepping.
                continue;
            }
            self.admit();
            self.drop_cancelled();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_batch {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            if job.tx.is_closed() {
                continue;
            }
            self.running.push(Seq {
                id: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
                decoder: StreamDecoder::new(job.params.stop.clone()),
                job,
                prefilled: false,
                last_token: 0,
                generated: 0,
                started: None,
                first_token: None,
            });
        }
    }

    /// Release sequences whose client disconnected or cancelled: nothing generates for nobody.
    fn drop_cancelled(&mut self) {
        let model = &mut self.model;
        self.running.retain(|s| {
            let gone = s.job.tx.is_closed();
            if gone {
                tracing::debug!(seq = s.id, "client gone; sequence released");
                model.release(s.id);
            }
            !gone
        });
    }

    fn fail_all(&mut self, why: &str) {
        for s in self.running.drain(..) {
            let _ = s.job.tx.send(Err(Status::unavailable(why)));
            self.model.release(s.id);
        }
        for j in self.waiting.drain(..) {
            let _ = j.tx.send(Err(Status::unavailable(why)));
        }
    }

    fn step(&mut self) {
        let now = Instant::now();
        let inputs: Vec<SeqInput> = self
            .running
            .iter_mut()
            .map(|s| {
                let tokens: &[u32] = if s.prefilled {
                    std::slice::from_ref(&s.last_token)
                } else {
                    s.started = Some(now);
                    &s.job.prompt
                };
                SeqInput {
                    seq_id: s.id,
                    tokens: tokens.as_ptr(),
                    n_tokens: tokens.len(),
                    sample: 1,
                    params: s.job.params.sampling,
                }
            })
            .collect();
        let mut outputs = vec![SeqOutput::default(); inputs.len()];
        if let Err(e) = self.model.step(&inputs, &mut outputs) {
            tracing::error!(error = %e, "step failed");
            let status: Status = e.into();
            for s in self.running.drain(..) {
                let _ = s.job.tx.send(Err(status.clone()));
                self.model.release(s.id);
            }
            return;
        }
        drop(inputs);
        let mut finished = Vec::new();
        for (i, (s, out)) in self.running.iter_mut().zip(&outputs).enumerate() {
            if let Some(reason) = advance(s, out, &self.text, self.cfg.max_context) {
                finished.push((i, reason));
            }
        }
        for (i, reason) in finished.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.model.release(s.id);
            if let Some(reason) = reason {
                let done = completion(&mut s, reason, &self.text);
                let _ = s.job.tx.send(Ok(done));
            }
        }
    }
}

/// Apply one sampled token to a sequence and stream it. Returns `Some(Some(reason))` when the
/// sequence finished, `Some(None)` when its client is gone, `None` to continue.
fn advance(
    s: &mut Seq,
    out: &SeqOutput,
    text: &TextModel,
    max_context: usize,
) -> Option<Option<FinishReason>> {
    let now = Instant::now();
    s.prefilled = true;
    s.generated += 1;
    s.last_token = out.token;
    s.first_token.get_or_insert(now);
    let released = s.decoder.push(text, out.token);
    let logprobs = (s.job.params.sampling.logprobs != 0).then(|| TokenLogprobs {
        logprob: out.logprob,
        top: (0..out.n_top as usize)
            .map(|k| TopLogprob {
                token_id: out.top_ids[k],
                text: text.decode(&[out.top_ids[k]], false),
                logprob: out.top_logprobs[k],
            })
            .collect(),
    });
    let chunk = GenerateResponse {
        text: released.text,
        token_id: Some(out.token),
        logprobs,
        done: None,
    };
    if s.job.tx.send(Ok(chunk)).is_err() {
        return Some(None);
    }
    let reason = if released.stopped {
        FinishReason::StopString
    } else if !s.job.params.ignore_eos && text.eos_ids.contains(&out.token) {
        FinishReason::Eos
    } else if s.generated >= s.job.params.max_new_tokens {
        FinishReason::Length
    } else if s.job.prompt.len() + s.generated as usize >= max_context {
        FinishReason::ContextLength
    } else {
        return None;
    };
    Some(Some(reason))
}

fn completion(s: &mut Seq, reason: FinishReason, text: &TextModel) -> GenerateResponse {
    let now = Instant::now();
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
    let first = s.first_token.unwrap_or(now);
    let decode_s = now.duration_since(first).as_secs_f64();
    let tail = if reason == FinishReason::StopString {
        String::new()
    } else {
        s.decoder.finish(text)
    };
    GenerateResponse {
        text: tail,
        token_id: None,
        logprobs: None,
        done: Some(Completion {
            finish_reason: reason as i32,
            prompt_tokens: s.job.prompt.len() as u32,
            completion_tokens: s.generated,
            time_to_first_token_ms: ms(s.job.received, first),
            decode_tokens_per_second: if s.generated > 1 && decode_s > 0.0 {
                (s.generated - 1) as f64 / decode_s
            } else {
                0.0
            },
            queue_ms: ms(s.job.received, s.started.unwrap_or(first)),
            total_ms: ms(s.job.received, now),
            seed: s.job.params.sampling.seed,
        }),
    }
}
