//! One scheduler thread per loaded model: it owns the plugin model (the only thread that touches
//! it), admits requests from a channel, runs one plugin step per iteration over every running
//! sequence (a prompt chunk for newcomers, one decode token for the others), detokenizes and
//! streams the results. This is continuous batching: sequences join and leave between steps.
//! Long prompts are fed `prefill_chunk` tokens per step so a newcomer's prefill never stalls the
//! running streams for more than one chunk, and a step feeds `max_step_tokens` rows at most
//! (every decode row, then prompt chunks in arrival order; [`plan_step`]). A sequence whose
//! client went away, or whose deadline passed, is released before the next step. The wait
//! queue is bounded: past `max_queue`, `submit` fails at once with RESOURCE_EXHAUSTED.

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
use crate::metrics::{Metrics, ModelStats, StepKind};
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
    /// The client's deadline (grpc-timeout), if it set one.
    pub deadline: Option<Instant>,
}

enum Command {
    Generate(Job),
    /// Stop: fail running requests with UNAVAILABLE, destroy the model, then acknowledge.
    Shutdown(oneshot::Sender<()>),
    /// Hot swap: finish every request already submitted, then destroy the model and acknowledge.
    Drain(oneshot::Sender<()>),
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Positions per sequence (prompt + generated).
    pub max_context: usize,
    /// Requests waiting for a slot, at most; more are refused with RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Prompt tokens fed per step per sequence.
    pub prefill_chunk: usize,
    /// Token rows one step feeds at most (decode rows and prompt chunks together); more than
    /// `max_batch`, so a prompt always advances. Bounds a step's time for the running streams,
    /// and the row counts a GPU backend meets (each new one is compiled or autotuned).
    pub max_step_tokens: usize,
}

/// Handle to a model's scheduler thread.
pub struct Scheduler {
    tx: mpsc::Sender<Command>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
    pub stats: Arc<ModelStats>,
    max_queue: usize,
    name: String,
}

static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// Steps slower than this are logged with what they fed (a 16-sequence decode step of an 8B
/// model takes ~12 ms on an H200; a 512-token prompt ~60 ms).
const SLOW_STEP: std::time::Duration = std::time::Duration::from_millis(250);

impl Scheduler {
    pub fn start(
        name: &str,
        model: PluginModel,
        text: Arc<TextModel>,
        cfg: SchedulerConfig,
        metrics: Arc<Metrics>,
    ) -> Scheduler {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(ModelStats::default());
        let lp = Loop {
            name: name.to_string(),
            model,
            text,
            cfg,
            metrics,
            stats: stats.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            draining: None,
            steps: 0,
        };
        let thread = std::thread::Builder::new()
            .name(format!("sched-{name}"))
            .spawn(move || lp.run(rx))
            .expect("spawn scheduler thread");
        Scheduler {
            tx,
            thread: std::sync::Mutex::new(Some(thread)),
            stats,
            max_queue: cfg.max_queue,
            name: name.to_string(),
        }
    }

    /// Queue a job, or refuse it at once when the wait queue is full.
    pub fn submit(&self, job: Job) -> Result<(), ServerError> {
        // Reserve a queue place first, so concurrent submits never overshoot the bound.
        let queued = self.stats.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.max_queue {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(ServerError::ResourceExhausted(format!(
                "model `{}`: the wait queue is full ({} requests waiting, --max-queue {}); retry later",
                self.name, queued, self.max_queue
            )));
        }
        self.tx.send(Command::Generate(job)).map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            ServerError::Unavailable("the model is being unloaded".into())
        })
    }

    /// Let every submitted request finish, then destroy the model (the old side of a hot swap;
    /// the caller has already routed new requests elsewhere).
    pub async fn drain(&self) {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.tx.send(Command::Drain(ack_tx)).is_ok() {
            let _ = ack_rx.await;
        }
        self.join().await;
    }

    async fn join(&self) {
        let thread = self.thread.lock().expect("scheduler lock").take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Stop the thread and wait until the model is destroyed. Requests submitted afterwards get
    /// UNAVAILABLE.
    pub async fn shutdown(&self) {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(ack_tx)).is_ok() {
            let _ = ack_rx.await;
        }
        self.join().await;
    }
}

struct Seq {
    id: u64,
    job: Job,
    decoder: StreamDecoder,
    /// Prompt tokens fed so far; the prompt is done when this reaches its length.
    fed: usize,
    last_token: u32,
    generated: u32,
    started: Option<Instant>,
    first_token: Option<Instant>,
    last_sent: Option<Instant>,
}

impl Seq {
    fn prefilled(&self) -> bool {
        self.fed >= self.job.prompt.len()
    }
}

struct Loop {
    name: String,
    model: PluginModel,
    text: Arc<TextModel>,
    cfg: SchedulerConfig,
    metrics: Arc<Metrics>,
    stats: Arc<ModelStats>,
    waiting: VecDeque<Job>,
    running: Vec<Seq>,
    /// Set by [`Command::Drain`]: exit once nothing is queued or running.
    draining: Option<oneshot::Sender<()>>,
    steps: u64,
}

impl Loop {
    /// Publish the KV cache and workspace bytes the plugin reports.
    fn refresh_memory(&mut self) {
        if let Ok(info) = self.model.info() {
            let get = |k: &str| info.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            self.stats
                .kv_cache_bytes
                .store(get("kv_cache_bytes"), Ordering::Relaxed);
            self.stats
                .workspace_bytes
                .store(get("workspace_bytes"), Ordering::Relaxed);
        }
    }

    /// A job left the wait queue (admitted, dropped or failed).
    fn dequeued(&self) {
        self.stats.queued.fetch_sub(1, Ordering::SeqCst);
    }

    fn set_running(&self) {
        self.stats
            .running
            .store(self.running.len(), Ordering::SeqCst);
    }

    /// End a request with an error status (and count it).
    fn fail(&self, tx: &ResponseTx, status: Status) {
        self.metrics.request_done(&self.name, status.code());
        let _ = tx.send(Err(status));
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        // What the model holds from its load (a GPU plugin's KV-cache pool) shows before the
        // first request.
        self.refresh_memory();
        loop {
            if self.draining.is_some()
                && self.running.is_empty()
                && self.waiting.is_empty()
                && self.stats.queued.load(Ordering::SeqCst) == 0
            {
                let ack = self.draining.take().expect("checked");
                drop(self);
                let _ = ack.send(());
                return;
            }
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
                    Command::Drain(ack) => self.draining = Some(ack),
                    Command::Shutdown(ack) => {
                        const WHY: &str = "the model was unloaded";
                        self.fail_all(WHY);
                        let stats = self.stats.clone();
                        // Destroy the model (weights, caches) before acknowledging.
                        drop(self);
                        // Anything that raced in after the shutdown command is answered too;
                        // later submits fail at send once `rx` is dropped.
                        while let Ok(cmd) = rx.try_recv() {
                            match cmd {
                                Command::Generate(job) => {
                                    let _ = job.tx.send(Err(Status::unavailable(WHY)));
                                    stats.queued.fetch_sub(1, Ordering::SeqCst);
                                }
                                Command::Shutdown(a) | Command::Drain(a) => {
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
            let before = self.running.len();
            self.admit();
            self.drop_cancelled();
            self.set_running();
            if !self.running.is_empty() {
                self.step();
                self.set_running();
                self.steps += 1;
            }
            // KV grows every step; the figure is refreshed when the batch changes and every 16
            // steps, not per step (on CUDA the pool query is a device round trip).
            if self.running.len() != before || self.steps.is_multiple_of(16) {
                self.refresh_memory();
            }
        }
    }

    fn admit(&mut self) {
        let now = Instant::now();
        // Waiting jobs whose client left or whose deadline passed never start.
        let mut keep = VecDeque::with_capacity(self.waiting.len());
        for job in std::mem::take(&mut self.waiting) {
            if job.tx.is_closed() {
                self.metrics
                    .request_done(&self.name, tonic::Code::Cancelled);
                self.dequeued();
            } else if job.deadline.is_some_and(|d| now >= d) {
                self.fail(&job.tx, deadline_status(0));
                self.dequeued();
            } else {
                keep.push_back(job);
            }
        }
        self.waiting = keep;
        while self.running.len() < self.cfg.max_batch {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.dequeued();
            self.running.push(Seq {
                id: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
                decoder: StreamDecoder::new(job.params.stop.clone()),
                job,
                fed: 0,
                last_token: 0,
                generated: 0,
                started: None,
                first_token: None,
                last_sent: None,
            });
        }
    }

    /// Release sequences whose client disconnected or cancelled (nothing generates for nobody)
    /// and those past their deadline (DEADLINE_EXCEEDED).
    fn drop_cancelled(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.job.tx.is_closed() {
                tracing::debug!(seq = s.id, "client gone; sequence released");
                self.metrics
                    .request_done(&self.name, tonic::Code::Cancelled);
            } else if s.job.deadline.is_some_and(|d| now >= d) {
                self.fail(&s.job.tx, deadline_status(s.generated));
            } else {
                i += 1;
                continue;
            }
            let s = self.running.remove(i);
            self.model.release(s.id);
        }
    }

    fn fail_all(&mut self, why: &str) {
        for s in std::mem::take(&mut self.running) {
            self.fail(&s.job.tx, Status::unavailable(why));
            self.model.release(s.id);
        }
        for j in std::mem::take(&mut self.waiting) {
            self.fail(&j.tx, Status::unavailable(why));
            self.dequeued();
        }
        self.set_running();
    }

    fn step(&mut self) {
        let now = Instant::now();
        let wants: Vec<Option<usize>> = self
            .running
            .iter()
            .map(|s| (!s.prefilled()).then(|| s.job.prompt.len() - s.fed))
            .collect();
        let plan = plan_step(&wants, self.cfg.prefill_chunk, self.cfg.max_step_tokens);
        // The sequences this step feeds (a prompt past the step's budget waits), in order.
        let stepping: Vec<usize> = (0..plan.len()).filter(|&i| plan[i] > 0).collect();
        let inputs: Vec<SeqInput> = stepping
            .iter()
            .map(|&i| {
                let s = &mut self.running[i];
                let (tokens, sample): (&[u32], bool) = if s.prefilled() {
                    (std::slice::from_ref(&s.last_token), true)
                } else {
                    s.started.get_or_insert(now);
                    let end = s.fed + plan[i];
                    // Sample only with the prompt's last chunk.
                    (&s.job.prompt[s.fed..end], end == s.job.prompt.len())
                };
                SeqInput {
                    seq_id: s.id,
                    tokens: tokens.as_ptr(),
                    n_tokens: tokens.len(),
                    sample: sample as u8,
                    params: s.job.params.sampling,
                }
            })
            .collect();
        let fed: Vec<(usize, bool)> = inputs.iter().map(|i| (i.n_tokens, i.sample != 0)).collect();
        let prompts = stepping.iter().filter(|&&i| wants[i].is_some()).count();
        let kind = match prompts {
            0 => StepKind::Decode,
            p if p == stepping.len() => StepKind::Prefill,
            _ => StepKind::Mixed,
        };
        let rows = fed.iter().map(|&(n, _)| n).sum();
        let mut outputs = vec![SeqOutput::default(); inputs.len()];
        let t0 = Instant::now();
        let stepped = self.model.step(&inputs, &mut outputs);
        let took = t0.elapsed();
        self.metrics.step(&self.name, kind, rows, took);
        if took > SLOW_STEP {
            // What such a step fed, to tell a backend's first-use compile or tuning (a row
            // count or chunk shape met for the first time) from a slow path.
            let chunks: Vec<usize> = fed.iter().map(|&(n, _)| n).collect();
            tracing::warn!(
                model = %self.name,
                ms = took.as_secs_f64() * 1e3,
                rows,
                ?kind,
                ?chunks,
                "slow step"
            );
        }
        if let Err(e) = stepped {
            tracing::error!(error = %e, "step failed");
            let status: Status = e.into();
            for s in std::mem::take(&mut self.running) {
                self.fail(&s.job.tx, status.clone());
                self.model.release(s.id);
            }
            return;
        }
        drop(inputs);
        let mut finished = Vec::new();
        for ((&i, out), &(n, sampled)) in stepping.iter().zip(&outputs).zip(&fed) {
            let s = &mut self.running[i];
            if !s.prefilled() {
                s.fed += n;
                if !sampled {
                    continue;
                }
            }
            let now = Instant::now();
            match s.last_sent {
                None => self.metrics.ttft(&self.name, now - s.job.received),
                Some(prev) => self.metrics.inter_token(&self.name, now - prev),
            }
            s.last_sent = Some(now);
            if let Some(reason) = advance(s, out, &self.text, self.cfg.max_context) {
                finished.push((i, reason));
            }
        }
        for (i, reason) in finished.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.model.release(s.id);
            let code = match reason {
                Some(reason) => {
                    let done = completion(&mut s, reason, &self.text);
                    let _ = s.job.tx.send(Ok(done));
                    tonic::Code::Ok
                }
                None => tonic::Code::Cancelled,
            };
            self.metrics.request_done(&self.name, code);
            self.metrics
                .tokens(&self.name, s.job.prompt.len() as u64, s.generated as u64);
        }
    }
}

/// Rows each running sequence feeds this step: `wants[i]` is `None` for a sequence decoding
/// (one row, always fed) or `Some(n)` for one with `n` prompt tokens left, which gets up to
/// `chunk` of them while the step has rows left of `budget`, in order (the earliest admitted
/// first); 0 = it waits for a later step. With `budget > max_batch` the first prompt always
/// advances.
fn plan_step(wants: &[Option<usize>], chunk: usize, budget: usize) -> Vec<usize> {
    let decoding = wants.iter().filter(|w| w.is_none()).count();
    let mut left = budget.saturating_sub(decoding);
    wants
        .iter()
        .map(|w| match *w {
            None => 1,
            Some(prompt) => {
                let n = prompt.min(chunk.max(1)).min(left);
                left -= n;
                n
            }
        })
        .collect()
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

fn deadline_status(generated: u32) -> Status {
    Status::deadline_exceeded(format!(
        "the request's deadline (grpc-timeout) passed after {generated} generated tokens; the sequence was released"
    ))
}

#[cfg(test)]
mod tests {
    use super::plan_step;

    #[test]
    fn decode_rows_go_first_and_prompts_share_what_is_left() {
        // 15 decoding, a newcomer's 600-token prompt: chunk 512, but 512 rows in all.
        let mut wants = vec![None; 15];
        wants.push(Some(600));
        let plan = plan_step(&wants, 512, 512);
        assert_eq!(&plan[..15], &[1; 15]);
        assert_eq!(plan[15], 512 - 15);
        // Prompts in arrival order: the first takes its chunk, the next what remains, the
        // last waits.
        let plan = plan_step(&[Some(300), None, Some(300), Some(10)], 256, 512);
        assert_eq!(plan, vec![256, 1, 255, 0]);
        // A short prompt takes only what it has left.
        let plan = plan_step(&[Some(7), Some(40)], 512, 512);
        assert_eq!(plan, vec![7, 40]);
        assert!(plan_step(&[Some(5); 3], 512, 4).iter().sum::<usize>() <= 4);
    }
}
