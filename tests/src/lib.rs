//! Harness for the end-to-end tests: start the real `llm-server` (built by the same cargo
//! invocation, found next to this test executable), run the real `llm` CLI, grpcurl and Python
//! clients against it.
//!
//! The binaries must be built before these tests run (`cargo build --release` in
//! scripts/test.sh); a missing binary is a test failure, not a skip.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use llm_proto::v1::llm_service_client::LlmServiceClient;
use tonic::transport::Channel;

/// `target/<profile>` of the build that produced this test executable.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// A binary of this workspace; panics with a hint if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --release --workspace`)",
        p.display()
    );
    p
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// Run a repo script that prints a path, e.g. `scripts/fetch-default-model.sh`.
fn script_path(script: &str) -> PathBuf {
    let s = repo_root().join(script);
    let out = Command::new(&s)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", s.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        s.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
}

/// The default model's GGUF, fetched on first use.
pub fn default_model() -> PathBuf {
    script_path("scripts/fetch-default-model.sh")
}

/// The Python virtualenv with grpcurl, grpcio and grpcio-tools.
pub fn python_env() -> PathBuf {
    script_path("scripts/python-env.sh")
}

/// A running `llm-server`, killed on drop.
pub struct Server {
    child: Child,
    pub addr: String,
    /// The metrics address (`--metrics-listen`), when enabled.
    pub metrics_addr: Option<String>,
    log: PathBuf,
}

impl Server {
    /// Start the server on a free port with extra `args` and wait until it listens.
    pub fn start(args: &[&str]) -> Server {
        Self::start_in(args, &bin_dir())
    }

    /// Same, with an explicit plugin directory.
    pub fn start_in(args: &[&str], plugin_dir: &Path) -> Server {
        Self::start_with(args, plugin_dir, &[])
    }

    /// Same, with extra environment variables for the server process.
    pub fn start_with(args: &[&str], plugin_dir: &Path, env: &[(&str, &Path)]) -> Server {
        let log = std::env::temp_dir().join(format!(
            "llm-server-{}-{}.log",
            std::process::id(),
            rand_u64()
        ));
        let mut child = Command::new(bin("llm-server"))
            .args(["--listen", "127.0.0.1:0", "--plugin-dir"])
            .arg(plugin_dir)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn llm-server");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let mut metrics_addr = None;
        loop {
            line.clear();
            reader.read_line(&mut line).expect("read server stdout");
            match line.trim().strip_prefix("llm-server metrics on http://") {
                Some(m) => metrics_addr = Some(m.trim_end_matches("/metrics").to_string()),
                None => break,
            }
        }
        let addr = line
            .trim()
            .strip_prefix("llm-server listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "server did not start: {line:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .to_string();
        Server {
            child,
            addr,
            metrics_addr,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal (`TERM`, `INT`) to the server process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait for the process to exit; its exit status, or None after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// GET /metrics (Prometheus text).
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let addr = self.metrics_addr.as_ref().expect("--metrics-listen");
        let mut conn = std::net::TcpStream::connect(addr).expect("connect metrics");
        write!(conn, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut resp = String::new();
        conn.read_to_string(&mut resp).expect("read metrics");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        resp.split_once("\r\n\r\n").expect("body").1.to_string()
    }

    /// One sample's value from /metrics, e.g. `llm_running_batch_size{model="m",device="cpu"}`
    /// (0 when absent).
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn client(&self) -> LlmServiceClient<Channel> {
        LlmServiceClient::connect(self.url())
            .await
            .expect("connect")
    }

    /// Wait until `models` are all ready, or panic after `timeout`.
    pub async fn wait_models(&self, models: &[&str], timeout: Duration) {
        let t0 = Instant::now();
        loop {
            if let Ok(mut c) = LlmServiceClient::connect(self.url()).await {
                if let Ok(r) = c.list_models(llm_proto::v1::ListModelsRequest {}).await {
                    // Ready ones only: ListModels also lists loads in progress.
                    let names: Vec<String> = r
                        .into_inner()
                        .models
                        .into_iter()
                        .filter(|m| m.state == "ready")
                        .map(|m| m.name)
                        .collect();
                    if models.iter().all(|m| names.iter().any(|n| n == m)) {
                        return;
                    }
                }
            }
            assert!(
                t0.elapsed() < timeout,
                "models {models:?} not loaded in time:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Run the `llm` CLI against this server.
    pub fn llm(&self, args: &[&str]) -> Output {
        Command::new(bin("llm"))
            .arg("--server")
            .arg(self.url())
            .args(args)
            .output()
            .expect("run llm")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Where the plugins were built (next to the server binary).
pub fn bin_dir() -> PathBuf {
    target_dir()
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish()
}

/// The seed's chat: what the README's demo and several tests send.
pub const SEED_SYSTEM: &str = "You are a helpful assistant";
pub const SEED_USER: &str = "Tell a light-hearted joke for a room of Data Scientists";

/// tests/fixtures/smollm2/reference.json.
pub fn smollm2_reference() -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(fixtures().join("smollm2/reference.json")).expect("reference.json"),
    )
    .expect("json")
}

pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A model directory for `family`'s tokenizer (tests/fixtures/tokenizers, decompressed) on top
/// of a tiny architecture fixture's weights: enough for the text side of the server.
pub fn tiny_with_tokenizer(arch: &str, family: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llm-e2e-{arch}-{family}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = fixtures().join("tiny").join(arch).join("bf16");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(tiny.join(f), dir.join(f)).unwrap();
    }
    let tok = fixtures().join("tokenizers").join(family);
    std::fs::copy(
        tok.join("tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
    assert_ok(
        &Command::new("python3")
            .args(["-c", "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))"])
            .arg(tok.join("tokenizer.json.xz"))
            .arg(dir.join("tokenizer.json"))
            .output()
            .unwrap(),
    );
    dir
}

/// Panic with the process's stderr unless it exited successfully.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run a Generate to the end: its token ids, or the status it failed with.
pub async fn run_at(
    url: String,
    req: llm_proto::v1::GenerateRequest,
) -> Result<Vec<u32>, tonic::Status> {
    use tokio_stream::StreamExt;
    let mut client = LlmServiceClient::connect(url).await.expect("connect");
    let mut stream = client.generate(req).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(msg) = stream.next().await {
        let msg = msg?;
        ids.extend(msg.token_id);
        if msg.done.is_some() {
            return Ok(ids);
        }
    }
    Err(tonic::Status::unknown("stream ended without done"))
}
