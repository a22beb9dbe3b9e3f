//! The metrics listener (`metrics.listen`): an HTTP/1.1 server (hyper) that answers
//! `GET /metrics` by asking the loop for a snapshot ([`Event::Metrics`]) and encoding it
//! here, off the loop. The loop only copies what it knows; a slow or stuck scraper holds a
//! connection of this task, never the loop.
//!
//! Bounded like the local API: at most [`MAX_CONNECTIONS`] at once (more are closed at
//! once), headers within [`HEADER_TIMEOUT`], small request buffers; nothing is read from a
//! request body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::warn;

use super::Event;
use crate::metrics::{self, Format};

/// Scrapes served at once; Prometheus servers scrape one at a time each.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a scrape waits for the loop (busy only for a moment, unless it is stuck).
const LOOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the listener (at start, so a taken port fails the start with a clear error).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let std = std::net::TcpListener::bind(addr)?;
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}

/// Serves scrapes on `listener` until the daemon stops.
pub fn spawn(listener: TcpListener, events: mpsc::UnboundedSender<Event>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: wait instead of spinning.
                    warn!("metrics listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                // Too many at once: closed without an answer (the scraper retries).
                continue;
            };
            let events = events.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(req, events.clone()));
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(16 * 1024)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served
                    && !e.is_incomplete_message()
                {
                    tracing::debug!("metrics connection from {peer}: {e}");
                }
                drop(permit);
            });
        }
    });
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/metrics" if get => {}
        "/" if get => {
            return Ok(text(
                StatusCode::OK,
                "vmkeeper: the metrics are at /metrics\n",
            ));
        }
        "/" | "/metrics" => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            r.headers_mut()
                .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
            return Ok(r);
        }
        _ => return Ok(text(StatusCode::NOT_FOUND, "not found; try /metrics\n")),
    }
    let format = Format::from_accept(req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
    let (reply, answer) = oneshot::channel();
    if events.send(Event::Metrics { reply }).is_err() {
        return Ok(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is stopping\n",
        ));
    }
    let snapshot = match tokio::time::timeout(LOOP_TIMEOUT, answer).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => {
            return Ok(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the daemon is stopping\n",
            ));
        }
        Err(_) => {
            return Ok(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the daemon's loop did not answer in time\n",
            ));
        }
    };
    let body = match metrics::encode(snapshot, format) {
        Ok(b) => b,
        Err(_) => {
            return Ok(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            ));
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(format.content_type()),
    );
    Ok(r)
}
