//! Connections to the providers, kept open between calls.
//!
//! A sidecar talks to a handful of origins (one per provider endpoint), over HTTP/1.1, so the
//! pool is a short list of origins, each with the connections opened to it. A call takes a
//! connection that is ready, or opens one; the connection goes back on the list as soon as the
//! response's head arrives, and is ready again once its body has been read to the end (hyper
//! signals it on the connection's own task). Nothing is spawned per call and no lock is held
//! across an await: the list is scanned under a mutex and the call runs after it is released.
//!
//! This replaces `hyper_util`'s general client (`bench/proxy-profile`: about 9 k instructions
//! per call in its pool, keyed by a SipHash of scheme and authority, a task spawned per call to
//! put the connection back, and the `Host` header built by `format!`), keeping what it did that
//! matters here: the request sent in origin form with a `Host`, TLS by `hyper-rustls`, the
//! connect timeout, idle connections dropped after `idle_timeout`, and a request that a reused
//! connection closed before sending sent again. It adds one thing the general client lacks: a
//! connection idle for over a second (`STALE_AFTER`) is given a turn of the runtime before use, so a
//! close that arrived while it sat idle is read before a request is written into it. The
//! provider's [`Origin`] is worked out once, from the configuration, not from each request's
//! URL. Idle connections are dropped when a call next looks at the list (or when the provider
//! closes them); a sidecar has one provider, so nothing accumulates.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Request, Response, Uri, header, uri};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

/// A connection idle longer than this is given one turn of the runtime before it is used, so
/// a close the provider sent meanwhile is read first. Shorter idles skip it: under load every
/// connection is reused within milliseconds, and the turn costs a system call.
const STALE_AFTER: Duration = Duration::from_secs(1);

/// Why a call did not get a response head from the provider.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection could be opened (DNS, TCP, TLS).
    #[error("cannot connect to {origin}")]
    Connect {
        /// `scheme://authority/`.
        origin: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The connection failed while the request was sent or its answer read.
    #[error("the upstream connection failed")]
    Send(#[source] hyper::Error),
}

/// Where calls connect: a scheme and an authority, with the `Host` header for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: uri::Scheme,
    authority: uri::Authority,
    /// The host, and the port unless it is the scheme's default.
    host: HeaderValue,
}

impl Origin {
    /// The origin of an absolute URL; `None` without a scheme or host.
    pub fn of(url: &Uri) -> Option<Origin> {
        let (scheme, authority) = (url.scheme()?.clone(), url.authority()?.clone());
        Some(Origin {
            host: host_header(&scheme, &authority)?,
            scheme,
            authority,
        })
    }

    /// `scheme://authority`, what the connector is given.
    fn url(&self) -> Uri {
        let mut parts = uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(uri::PathAndQuery::from_static("/"));
        Uri::from_parts(parts).unwrap_or_default()
    }
}

/// The client every upstream call goes through.
pub struct Connections {
    connector: HttpsConnector<HttpConnector>,
    pools: Mutex<Vec<(Origin, Vec<Conn>)>>,
    idle_timeout: Duration,
}

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// When it last carried a call: an idle connection older than the timeout is closed.
    used: Instant,
}

impl Connections {
    /// A client opening connections with `connector`, closing them after `idle_timeout` idle.
    pub fn new(connector: HttpsConnector<HttpConnector>, idle_timeout: Duration) -> Self {
        Connections {
            connector,
            pools: Mutex::new(Vec::new()),
            idle_timeout,
        }
    }

    /// Sends `req` to `origin` and returns the response head; the body streams on. The
    /// request's URI is its path and query (origin form); its `Host` is set here.
    pub async fn request(
        &self,
        origin: &Origin,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, CallError> {
        req.headers_mut().insert(header::HOST, origin.host.clone());
        loop {
            let (mut conn, reused) = match self.checkout(origin) {
                Some(conn) => (conn, true),
                None => (self.connect(origin).await?, false),
            };
            if reused && conn.used.elapsed() > STALE_AFTER {
                // Idle a while: the provider may have closed it, and the close may be waiting
                // unread. One yield lets the runtime read it (the connection's task runs first
                // and marks it closed); otherwise hyper would write the request into it.
                tokio::task::yield_now().await;
                if conn.sender.is_closed() || !conn.sender.is_ready() {
                    continue;
                }
            }
            match conn.sender.try_send_request(req).await {
                Ok(response) => {
                    conn.used = Instant::now();
                    self.checkin(origin, conn);
                    return Ok(response);
                }
                // Closed before the request left, as hyper knew when it took it: nothing was
                // sent, so it is sent again, on another connection. A request already written
                // when the provider's close is read (it closed the connection at the moment
                // the call took it) is not: the provider may have read it, and a second send
                // could bill it twice. The call fails (502), as with `hyper_util`'s client.
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => req = back,
                    _ => return Err(CallError::Send(e.into_error())),
                },
            }
        }
    }

    /// A ready connection to `origin`, if there is one. Drops the connections that closed
    /// and the idle ones past the timeout on the way.
    fn checkout(&self, origin: &Origin) -> Option<Conn> {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        let conns = &mut pools.iter_mut().find(|(o, _)| o == origin)?.1;
        let mut found = None;
        let mut i = 0;
        while i < conns.len() {
            let conn = &conns[i];
            let ready = conn.sender.is_ready();
            if conn.sender.is_closed() || (ready && conn.used.elapsed() > self.idle_timeout) {
                conns.swap_remove(i);
            } else if ready && found.is_none() {
                found = Some(conns.swap_remove(i));
            } else {
                i += 1;
            }
        }
        found
    }

    /// Puts a connection back in its origin's pool; it is taken again once ready.
    fn checkin(&self, origin: &Origin, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        match pools.iter_mut().find(|(o, _)| o == origin) {
            Some((_, conns)) => conns.push(conn),
            None => pools.push((origin.clone(), vec![conn])),
        }
    }

    /// Opens a connection (TCP, and TLS for `https`) and starts its task.
    async fn connect(&self, origin: &Origin) -> Result<Conn, CallError> {
        let url = origin.url();
        let failed = |source| CallError::Connect {
            origin: origin.url().to_string(),
            source,
        };
        let io = self.connector.clone().oneshot(url).await.map_err(failed)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| failed(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection closed");
            }
        });
        Ok(Conn {
            sender,
            used: Instant::now(),
        })
    }

    /// Connections open now, ready or carrying a call.
    pub fn open(&self) -> usize {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools
            .iter()
            .flat_map(|(_, conns)| conns)
            .filter(|c| !c.sender.is_closed())
            .count()
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("open", &self.open())
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// `host[:port]`, the port left out when it is the scheme's default.
fn host_header(scheme: &uri::Scheme, authority: &uri::Authority) -> Option<HeaderValue> {
    let default_port = match scheme.as_str() {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    let host = authority.host();
    let value = match authority.port_u16() {
        Some(port) if Some(port) != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_leaves_out_only_the_default_port() {
        for (uri, want) in [
            ("https://api.openai.com/v1", "api.openai.com"),
            ("https://api.openai.com:443/v1", "api.openai.com"),
            ("https://gw.internal:8443/v1", "gw.internal:8443"),
            ("http://127.0.0.1:80/", "127.0.0.1"),
            ("http://127.0.0.1:8080/", "127.0.0.1:8080"),
            ("http://[::1]:9000/", "[::1]:9000"),
            ("http://user@vllm:8000/", "vllm:8000"),
        ] {
            let origin = Origin::of(&uri.parse().unwrap()).unwrap();
            assert_eq!(origin.host, want, "{uri}");
        }
    }

    /// A provider answering `ok` to every request, keeping the connection open unless
    /// `close_after_each`; it counts connections and keeps each request's head.
    struct Provider {
        url: String,
        accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        heads: std::sync::Arc<Mutex<Vec<String>>>,
        /// Answers are held until this many requests have arrived.
        hold_until: std::sync::Arc<tokio::sync::Semaphore>,
    }

    async fn provider(close_after_each: bool) -> Provider {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let hold_until = Arc::new(tokio::sync::Semaphore::new(0));
        let (a, h, hold) = (accepted.clone(), heads.clone(), hold_until.clone());
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let (h, hold) = (h.clone(), hold.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        h.lock().unwrap().push(String::from_utf8(head).unwrap());
                        hold.acquire().await.unwrap().forget();
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if sock.write_all(reply).await.is_err() || close_after_each {
                            return;
                        }
                    }
                });
            }
        });
        Provider {
            url,
            accepted,
            heads,
            hold_until,
        }
    }

    fn connections() -> Connections {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(
                rustls::ClientConfig::builder_with_provider(
                    rustls::crypto::ring::default_provider().into(),
                )
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Connections::new(https, Duration::from_secs(90))
    }

    async fn get(c: &Connections, url: &str) -> Result<String, CallError> {
        use http_body_util::BodyExt;
        let origin = Origin::of(&url.parse().unwrap()).unwrap();
        let req = Request::get("/v1/models?x=1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = c.request(&origin, req).await?;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Ok(String::from_utf8(body.to_vec()).unwrap())
    }

    /// A provider answering at once (closing after each answer or not), a client, and `calls`
    /// calls made through it one after another.
    async fn calls_in_turn(close_after_each: bool, calls: usize) -> (Provider, Connections) {
        let p = provider(close_after_each).await;
        p.hold_until.add_permits(1_000);
        let c = connections();
        for _ in 0..calls {
            assert_eq!(get(&c, &p.url).await.unwrap(), "ok");
        }
        (p, c)
    }

    #[tokio::test]
    async fn calls_in_turn_share_one_connection_and_calls_at_once_open_more() {
        use std::sync::atomic::Ordering;
        let (p, c) = calls_in_turn(false, 5).await;
        assert_eq!(
            p.accepted.load(Ordering::SeqCst),
            1,
            "one connection, reused"
        );
        let heads = p.heads.lock().unwrap().clone();
        let port = p.url.rsplit(':').next().unwrap();
        assert!(
            heads[0].starts_with("GET /v1/models?x=1 HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[0].contains(&format!("host: 127.0.0.1:{port}\r\n")),
            "{}",
            heads[0]
        );

        // Three calls held by the provider at once need three connections.
        let q = provider(false).await;
        let (a, b, d) = tokio::join!(get(&c, &q.url), get(&c, &q.url), async {
            while q.heads.lock().unwrap().len() < 2 {
                tokio::task::yield_now().await;
            }
            q.hold_until.add_permits(1_000);
            get(&c, &q.url).await
        });
        assert_eq!(
            (a.unwrap(), b.unwrap(), d.unwrap()),
            ("ok".into(), "ok".into(), "ok".into())
        );
        let opened = q.accepted.load(Ordering::SeqCst);
        assert!((2..=3).contains(&opened), "opened {opened}");
        assert_eq!(
            c.open(),
            1 + opened,
            "every connection kept for the next call"
        );
    }

    #[tokio::test]
    async fn a_connection_the_provider_closed_is_not_used_again() {
        use std::sync::atomic::Ordering;
        let (p, _c) = calls_in_turn(true, 3).await;
        assert_eq!(p.accepted.load(Ordering::SeqCst), 3);
    }

    /// The provider closes a connection that has been idle over a second, and the close is
    /// still unread when the next call takes it: the call reads it first and opens another.
    #[tokio::test]
    async fn a_close_that_came_while_idle_is_read_before_the_connection_is_used() {
        use std::io::{Read, Write};
        use std::sync::mpsc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (close, closing) = mpsc::channel::<()>();
        let (closed, was_closed) = mpsc::channel::<()>();
        // A provider on a thread of its own, so it closes while the client's runtime is not
        // running: the client's connection task has not read the close when the call takes it.
        let provider = std::thread::spawn(move || {
            let answer = |sock: &mut std::net::TcpStream| {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if sock.read(&mut byte).unwrap() == 0 {
                        return false;
                    }
                    head.push(byte[0]);
                }
                sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .is_ok()
            };
            let (mut first, _) = listener.accept().unwrap();
            assert!(answer(&mut first));
            // Closed only once the client has read the answer and left the connection idle.
            closing.recv().unwrap();
            drop(first);
            closed.send(()).unwrap();
            let (mut second, _) = listener.accept().unwrap();
            assert!(
                answer(&mut second),
                "the second call came on a new connection"
            );
        });
        let c = connections();
        assert_eq!(get(&c, &url).await.unwrap(), "ok");
        close.send(()).unwrap();
        // Blocks the runtime's only thread past STALE_AFTER: the close arrives unread.
        was_closed.recv().unwrap();
        std::thread::sleep(STALE_AFTER + Duration::from_millis(100));
        assert_eq!(get(&c, &url).await.unwrap(), "ok");
        provider.join().unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_provider_is_a_connect_error_naming_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let c = connections();
        match get(&c, &url).await {
            Err(CallError::Connect { origin, .. }) => assert_eq!(origin, format!("{url}/")),
            other => panic!("{other:?}"),
        }
        assert!(Origin::of(&"/v1/models".parse().unwrap()).is_none());
    }
}
