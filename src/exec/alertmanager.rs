//! Alertmanager's API v2, the three calls vmkeeper needs: list the silences, create (or
//! update) one, expire one.
//!
//! Plain HTTP/1.1 with hyper, which the metrics listener uses too (one HTTP stack, async on
//! the daemon's runtime, no blocking pool thread held per call). One connection per call:
//! calls are rare (a few per deletion or maintenance slot, one list every few minutes), so a
//! pool would only keep idle sockets open. Every call has a deadline.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::config::AlertmanagerConfig;

/// The longest one call may take, connecting included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bodies longer than this are refused (a list of many thousand silences still fits).
const MAX_BODY: usize = 32 << 20;

/// Why a call to Alertmanager failed.
#[derive(Debug, thiserror::Error)]
pub enum AlertmanagerError {
    /// No TCP connection.
    #[error("cannot connect to Alertmanager at {addr}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The call did not finish in time.
    #[error("Alertmanager did not answer {what} within {CALL_TIMEOUT:?}")]
    Timeout {
        /// The call.
        what: String,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with Alertmanager failed ({what})")]
    Http {
        /// The call.
        what: String,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// The request could not be built (a host name HTTP cannot carry).
    #[error("cannot build the request {what}")]
    Request {
        /// The call.
        what: String,
        /// The cause.
        #[source]
        source: hyper::http::Error,
    },
    /// Alertmanager refused the call.
    #[error("Alertmanager answered {what} with {status}: {body}")]
    Status {
        /// The call.
        what: String,
        /// The status.
        status: StatusCode,
        /// What it said.
        body: String,
    },
    /// The answer is not what API v2 describes.
    #[error("Alertmanager's answer to {what} is not API v2 JSON")]
    Json {
        /// The call.
        what: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The answer is too long.
    #[error("Alertmanager's answer to {what} is longer than {MAX_BODY} bytes")]
    TooLong {
        /// The call.
        what: String,
    },
}

impl AlertmanagerError {
    /// Alertmanager does not know the silence (`404`, or `500` "silence not found" from a
    /// DELETE).
    pub fn is_not_found(&self) -> bool {
        matches!(self, AlertmanagerError::Status { status, body, .. }
            if *status == StatusCode::NOT_FOUND || body.contains("not found"))
    }
}

/// A label matcher of a silence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Matcher {
    /// Label name.
    pub name: String,
    /// Value.
    pub value: String,
    /// A regular expression.
    #[serde(default)]
    pub is_regex: bool,
    /// `=` (or `!=` when false).
    #[serde(default = "yes")]
    pub is_equal: bool,
}

fn yes() -> bool {
    true
}

impl Matcher {
    /// `name="value"`.
    pub fn equal(name: &str, value: &str) -> Matcher {
        Matcher {
            name: name.to_owned(),
            value: value.to_owned(),
            is_regex: false,
            is_equal: true,
        }
    }
}

/// Where a silence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SilenceState {
    /// Silencing now.
    Active,
    /// Starts later.
    Pending,
    /// Over (ended, or expired by a DELETE).
    Expired,
}

#[derive(Debug, Clone, Deserialize)]
struct Status {
    state: SilenceState,
}

/// A silence as Alertmanager lists it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Silence {
    /// Its id.
    pub id: String,
    /// What it matches.
    pub matchers: Vec<Matcher>,
    /// From.
    pub starts_at: DateTime<Utc>,
    /// Until.
    pub ends_at: DateTime<Utc>,
    /// Who made it.
    #[serde(default)]
    pub created_by: String,
    /// Why.
    #[serde(default)]
    pub comment: String,
    status: Status,
}

impl Silence {
    /// Active, pending or expired.
    pub fn state(&self) -> SilenceState {
        self.status.state
    }
}

/// A silence to create, or to update when `id` is given (Alertmanager may then replace it
/// and answer with a new id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSilence {
    /// The silence to update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What it matches.
    pub matchers: Vec<Matcher>,
    /// From (whole seconds).
    #[serde(serialize_with = "seconds")]
    pub starts_at: DateTime<Utc>,
    /// Until (whole seconds).
    #[serde(serialize_with = "seconds")]
    pub ends_at: DateTime<Utc>,
    /// Who makes it.
    pub created_by: String,
    /// Why.
    pub comment: String,
}

fn seconds<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    silence_id: String,
}

/// An Alertmanager's API v2.
#[derive(Debug, Clone)]
pub struct Alertmanager {
    host: String,
    port: u16,
    path: String,
}

impl Alertmanager {
    /// The Alertmanager at `config`'s URL (nothing is connected yet).
    pub fn new(config: &AlertmanagerConfig) -> Alertmanager {
        Alertmanager {
            host: config.host.clone(),
            port: config.port,
            path: config.path.clone(),
        }
    }

    /// Every silence Alertmanager has (expired ones included, until it forgets them).
    pub async fn list(&self) -> Result<Vec<Silence>, AlertmanagerError> {
        let what = "GET /api/v2/silences".to_owned();
        let body = self
            .call(Method::GET, "/api/v2/silences", None, &what)
            .await?;
        serde_json::from_slice(&body).map_err(|source| AlertmanagerError::Json { what, source })
    }

    /// Creates (or updates) a silence; returns its id.
    pub async fn create(&self, silence: &NewSilence) -> Result<String, AlertmanagerError> {
        let what = "POST /api/v2/silences".to_owned();
        let json = serde_json::to_vec(silence).map_err(|source| AlertmanagerError::Json {
            what: what.clone(),
            source,
        })?;
        let body = self
            .call(Method::POST, "/api/v2/silences", Some(json), &what)
            .await?;
        let created: Created = serde_json::from_slice(&body)
            .map_err(|source| AlertmanagerError::Json { what, source })?;
        Ok(created.silence_id)
    }

    /// Expires silence `id` at once.
    pub async fn expire(&self, id: &str) -> Result<(), AlertmanagerError> {
        let path = format!("/api/v2/silence/{id}");
        let what = format!("DELETE {path}");
        self.call(Method::DELETE, &path, None, &what).await?;
        Ok(())
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<Bytes, AlertmanagerError> {
        tokio::time::timeout(CALL_TIMEOUT, self.exchange(method, path, body, what))
            .await
            .map_err(|_| AlertmanagerError::Timeout {
                what: what.to_owned(),
            })?
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<Bytes, AlertmanagerError> {
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| AlertmanagerError::Connect {
                addr: authority.clone(),
                source,
            })?;
        let http = |source| AlertmanagerError::Http {
            what: what.to_owned(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // The connection is driven beside the request and dropped with it (also when the
        // deadline above cuts the call short).
        let conn = AbortOnDrop(tokio::spawn(conn));
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.path))
            .header(hyper::header::HOST, authority)
            .header(
                hyper::header::USER_AGENT,
                concat!("vmkeeper/", env!("CARGO_PKG_VERSION")),
            )
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|source| AlertmanagerError::Request {
                what: what.to_owned(),
                source,
            })?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY);
        let bytes = limited
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(source) => http(*source),
                Err(_) => AlertmanagerError::TooLong {
                    what: what.to_owned(),
                },
            })?
            .to_bytes();
        drop(conn);
        if !status.is_success() {
            return Err(AlertmanagerError::Status {
                what: what.to_owned(),
                status,
                body: String::from_utf8_lossy(&bytes)
                    .trim()
                    .chars()
                    .take(300)
                    .collect(),
            });
        }
        Ok(bytes)
    }
}

/// A task aborted when its handle goes.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
