//! arbor-server: `arbor serve`. An OpenAI-compatible HTTP API (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`) and arbor's `/v1/search`, plus `/health` and
//! `/metrics`, on axum + tokio. Every request feeds the engine's one
//! [`arbor_search::Scheduler`], which a dedicated thread owns ([`worker`]); handlers talk to
//! it over channels. See docs/API.md for the endpoints.
//!
//! - [`api`]: request types and their checks; [`error`]: OpenAI-style errors;
//! - `generation`/`format`: following a request's choices and the response shapes;
//! - `sse`: event streams whose drop (client gone) cancels the work;
//! - [`metrics`]: Prometheus text.

pub mod api;
pub mod error;
mod format;
mod generation;
pub mod metrics;
pub mod prompt;
mod routes;
mod sse;
mod state;
pub mod worker;

pub use error::ApiError;

use arbor_search::Scheduler;
use metrics::Metrics;
use state::AppState;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use worker::{Command, WorkerHandle};

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The id `/v1/models` lists; requests may name it or leave `model` out.
    pub model_id: String,
    /// The model's context, shown by `/v1/models`.
    pub max_context: usize,
    /// Required as `Authorization: Bearer KEY` on `/v1/*` when set.
    pub api_key: Option<String>,
    /// Most requests held at once (running or waiting); more get 429.
    pub max_queue: usize,
    /// A request running longer is cancelled (504, or an error event in a stream).
    pub request_timeout: Duration,
    /// Larger bodies get 413.
    pub max_body_bytes: usize,
    /// After SIGINT/SIGTERM, in-flight work may finish for this long before it is cancelled.
    pub shutdown_grace: Duration,
    /// Whether `/v1/search` may use `command:CMD` and `code[:PYTHON]` verifiers (they run
    /// shell commands and candidate programs).
    pub allow_command_verifier: bool,
    /// Verifier models loaded into the scheduler, as `(spec, lane)`; `/v1/search` may name
    /// them by their spec.
    pub verifier_models: Vec<(String, usize)>,
}

impl ServerConfig {
    /// Defaults for a model called `model_id` with a context of `max_context` tokens.
    pub fn new(model_id: impl Into<String>, max_context: usize) -> Self {
        ServerConfig {
            model_id: model_id.into(),
            max_context,
            api_key: None,
            max_queue: 512,
            request_timeout: Duration::from_secs(600),
            max_body_bytes: 4 << 20,
            shutdown_grace: Duration::from_secs(30),
            allow_command_verifier: false,
            verifier_models: Vec::new(),
        }
    }
}

/// Serves on `listener` until `shutdown` completes; then stops accepting, lets in-flight work
/// finish for the grace period, cancels what is left (streams end with an error event) and
/// returns once every connection has closed (or a few seconds after the grace period).
pub async fn serve(
    listener: TcpListener,
    sched: Scheduler,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let worker = WorkerHandle::spawn(sched, metrics.clone())?;
    let state = Arc::new(AppState::new(cfg, worker, metrics));
    let app = routes::router(state.clone());
    let signalled = Arc::new(tokio::sync::Notify::new());
    let (st, sig) = (state.clone(), signalled.clone());
    let graceful = async move {
        shutdown.await;
        st.shutting_down.store(true, Ordering::SeqCst);
        sig.notify_one();
    };
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(graceful)
        .into_future();
    let grace = state.cfg.shutdown_grace;
    let watchdog = async move {
        signalled.notified().await;
        tokio::time::sleep(grace).await;
        state.worker.send(Command::CancelAll);
        // Connections whose clients stop reading are not waited for forever.
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    tokio::select! {
        r = server => r,
        _ = watchdog => Ok(()),
    }
}

/// A server running on the current tokio runtime (for tests and embedding).
pub struct ServerHandle {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ServerHandle {
    /// Binds `addr` (port 0: any free port) and serves in a task.
    pub async fn start(sched: Scheduler, cfg: ServerConfig, addr: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, sched, cfg, async move {
            let _ = rx.await;
        }));
        Ok(ServerHandle {
            addr,
            stop: Some(tx),
            task,
        })
    }

    /// Shuts down gracefully and waits until the server has stopped.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task
            .await
            .map_err(|e| std::io::Error::other(format!("the server task failed: {e}")))?
    }
}

/// Runs the server on its own runtime until SIGINT/SIGTERM: binds `addr`, prints where it
/// listens to stderr, serves, and returns after the graceful shutdown.
pub fn run(sched: Scheduler, cfg: ServerConfig, addr: &str, load_secs: f64) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
        })?;
        let local = listener.local_addr()?;
        eprintln!(
            "Serving {} (loaded in {load_secs:.1} s) on http://{local}; OpenAI base URL http://{local}/v1{}. Ctrl-C stops.",
            cfg.model_id,
            if cfg.api_key.is_some() { " (API key required)" } else { "" }
        );
        serve(listener, sched, cfg, shutdown_signal()).await?;
        eprintln!("Server stopped");
        Ok(())
    })
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
