//! The provider side: the HTTP client, the request the provider receives (client headers minus
//! credentials and hop-by-hop headers, plus the key), and reading bodies with an idle timeout.

use std::fmt;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, header};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::ProviderKind;
use crate::connections::{Connections, Origin};
use crate::error::ProxyError;

/// The provider key. Its `Debug` never shows it, so it cannot leak through a log line.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProviderKey(Option<Secret>);

/// A key and its two header values, made once per key rather than once per call (`None` when
/// the key holds bytes a header cannot carry).
#[derive(Clone, PartialEq, Eq)]
struct Secret {
    text: String,
    /// `Authorization: Bearer <key>` (OpenAI and compatible).
    bearer: Option<HeaderValue>,
    /// `x-api-key: <key>` (Anthropic).
    bare: Option<HeaderValue>,
}

impl ProviderKey {
    /// Wraps a key read from the sidecar's own file or Vault; empty means none.
    pub fn new(key: Option<String>) -> Self {
        let secret = |text: String| {
            let header = |v: &str| {
                let mut v = HeaderValue::from_str(v).ok()?;
                v.set_sensitive(true);
                Some(v)
            };
            Secret {
                bearer: header(&format!("Bearer {text}")),
                bare: header(&text),
                text,
            }
        };
        ProviderKey(
            key.map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .map(secret),
        )
    }

    /// No key.
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }

    /// Replaces every occurrence of the key in `body` (an upstream error may echo it).
    pub fn scrub(&self, body: Bytes) -> Bytes {
        let Some(key) = self.0.as_ref().map(|s| s.text.as_bytes()) else {
            return body;
        };
        match find(&body, key) {
            None => body,
            Some(_) => Bytes::from(replace_all(&body, key, b"[redacted]")),
        }
    }
}

impl fmt::Debug for ProviderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "ProviderKey([redacted])"
        } else {
            "ProviderKey(none)"
        })
    }
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `hay` with every `needle` replaced by `with`.
pub fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut rest = hay;
    while let Some(at) = find(rest, needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// Builds the client: HTTP/1.1, TLS by rustls (ring) with the system's roots, idle connections
/// closed after 90 s.
pub fn client(connect_timeout: Duration) -> Result<Connections, rustls::Error> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let provider = || rustls::crypto::ring::default_provider();
    let builder = match hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider())
    {
        Ok(b) => b,
        Err(e) => {
            // No CA bundle (a scratch image): plain-HTTP upstreams still work; HTTPS ones fail
            // with a certificate error on first use.
            tracing::warn!(error = %e, "no system CA certificates; HTTPS upstreams will fail");
            let config = rustls::ClientConfig::builder_with_provider(provider().into())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
        }
    };
    let https = builder.https_or_http().enable_http1().wrap_connector(http);
    Ok(Connections::new(https, Duration::from_secs(90)))
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the ones the sidecar
/// owns on the way out.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
];

/// Client headers that must not reach the provider: the client's token, and `accept-encoding`
/// (the sidecar reads usage from the body, so it asks for it uncompressed: `identity`, said
/// explicitly, because a request without the header accepts any coding).
const CLIENT_ONLY: [&str; 5] = [
    "host",
    "authorization",
    "x-api-key",
    "api-key",
    "accept-encoding",
];

/// The provider's base URL, parsed once: the origin calls connect to, and the path prefix
/// each call's path is joined to (`/v1` not repeated).
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Where calls connect.
    pub origin: Origin,
    /// The base URL's path, without its trailing `/`.
    prefix: String,
}

impl Upstream {
    /// Parses `base` (`provider.upstream`); an error says why it cannot be used.
    pub fn parse(base: &str) -> Result<Upstream, String> {
        let url: Uri = base
            .parse()
            .map_err(|e| format!("provider.upstream {base:?} is not a URL: {e}"))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) {
            return Err(format!(
                "provider.upstream {base:?} must start with http:// or https://"
            ));
        }
        if url.query().is_some() {
            return Err(format!("provider.upstream {base:?} must not carry a query"));
        }
        let origin =
            Origin::of(&url).ok_or_else(|| format!("provider.upstream {base:?} has no host"))?;
        Ok(Upstream {
            origin,
            prefix: url.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The path and query a call to `path` is sent to (the request line's origin form).
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
        let path = match self.prefix.ends_with("/v1") {
            true => path.strip_prefix("/v1").unwrap_or(path),
            false => path,
        };
        let query_len = query.map_or(0, |q| q.len() + 1);
        let mut target = String::with_capacity(self.prefix.len() + path.len() + query_len);
        target.push_str(&self.prefix);
        target.push_str(path);
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        Uri::try_from(target)
            .map_err(|_| ProxyError::Internal("upstream URL does not parse".into()))
    }
}

/// The request the provider receives.
#[allow(clippy::too_many_arguments)]
pub fn request(
    method: Method,
    uri: Uri,
    client_headers: &HeaderMap,
    body: Bytes,
    provider: ProviderKind,
    key: &ProviderKey,
    anthropic_version: &str,
) -> Result<Request<Full<Bytes>>, ProxyError> {
    let mut headers = HeaderMap::with_capacity(client_headers.len() + 2);
    for (name, value) in client_headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || CLIENT_ONLY.contains(&n) {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    if let Some(k) = key.0.as_ref() {
        let (name, value) = match provider {
            ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), &k.bare),
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
                (header::AUTHORIZATION, &k.bearer)
            }
        };
        let value = value.clone().ok_or_else(|| {
            ProxyError::Internal("the provider key is not a valid header value".into())
        })?;
        headers.insert(name, value);
    }
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if provider == ProviderKind::Anthropic
        && !headers.contains_key("anthropic-version")
        && let Ok(v) = HeaderValue::from_str(anthropic_version)
    {
        headers.insert("anthropic-version", v);
    }
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

/// The provider's response headers as the client gets them (hop-by-hop removed).
pub fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Why a body could not be read to its end.
#[derive(Debug)]
pub enum ReadError {
    /// No data for longer than the idle timeout.
    Idle,
    /// The connection broke.
    Broken,
}

/// Reads a whole upstream body, allowing at most `idle` between chunks.
pub async fn read_all(mut body: Incoming, idle: Duration) -> Result<Bytes, (ReadError, Bytes)> {
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err((ReadError::Idle, buf.freeze())),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(_))) => return Err((ReadError::Broken, buf.freeze())),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_joins_without_repeating_v1() {
        let cases = [
            (
                "https://api.openai.com",
                "/v1/chat/completions",
                "/v1/chat/completions",
            ),
            ("https://api.openai.com/", "/v1/models", "/v1/models"),
            (
                "http://vllm:8000/v1",
                "/v1/chat/completions",
                "/v1/chat/completions",
            ),
            (
                "http://gw/openai/v1/",
                "/v1/embeddings",
                "/openai/v1/embeddings",
            ),
        ];
        for (base, path, want) in cases {
            let up = Upstream::parse(base).unwrap();
            assert_eq!(up.uri(path, None).unwrap().to_string(), want, "{base}");
        }
        let up = Upstream::parse("http://h").unwrap();
        assert_eq!(up.uri("/v1/models", Some("a=b")).unwrap(), "/v1/models?a=b");
        assert_eq!(
            up.origin,
            Origin::of(&"http://h/x".parse().unwrap()).unwrap()
        );
    }

    #[test]
    fn an_unusable_base_url_is_refused_saying_why() {
        for (base, why) in [
            ("api.openai.com", "must start with http:// or https://"),
            ("ftp://h/v1", "must start with http:// or https://"),
            ("http://h/v1?x=1", "must not carry a query"),
            ("http://h h/", "is not a URL"),
        ] {
            let e = Upstream::parse(base).unwrap_err();
            assert!(e.contains(why), "{base}: {e}");
        }
    }

    #[test]
    fn key_replaces_client_credentials_and_is_never_debug_printed() {
        let key = ProviderKey::new(Some("sk-live-123\n".into()));
        assert_eq!(format!("{key:?}"), "ProviderKey([redacted])");
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer pod-token"),
        );
        h.insert("x-api-key", HeaderValue::from_static("pod-token"));
        h.insert("accept-encoding", HeaderValue::from_static("gzip"));
        h.insert("openai-organization", HeaderValue::from_static("org-1"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        let uri: Uri = "/v1/models".parse().unwrap();
        let r = request(
            Method::GET,
            uri.clone(),
            &h,
            Bytes::new(),
            ProviderKind::Openai,
            &key,
            "v",
        )
        .unwrap();
        assert_eq!(r.headers()[header::AUTHORIZATION], "Bearer sk-live-123");
        assert!(r.headers()[header::AUTHORIZATION].is_sensitive());
        assert!(r.headers().get("x-api-key").is_none());
        assert_eq!(
            r.headers()["accept-encoding"],
            "identity",
            "the client's gzip is replaced: usage is read from the body"
        );
        assert!(r.headers().get(header::CONNECTION).is_none());
        assert_eq!(r.headers()["openai-organization"], "org-1");
        let r = request(
            Method::GET,
            uri,
            &h,
            Bytes::new(),
            ProviderKind::Anthropic,
            &key,
            "2023-06-01",
        )
        .unwrap();
        assert_eq!(r.headers()["x-api-key"], "sk-live-123");
        assert!(r.headers().get(header::AUTHORIZATION).is_none());
        assert_eq!(r.headers()["anthropic-version"], "2023-06-01");
    }

    #[test]
    fn scrub_removes_every_copy_of_the_key() {
        let key = ProviderKey::new(Some("sk-abc".into()));
        let out = key.scrub(Bytes::from_static(b"bad key sk-abc; again sk-abc."));
        assert_eq!(&out[..], b"bad key [redacted]; again [redacted].");
        assert_eq!(
            replace_all(b"a,\"usage\":null}", b",\"usage\":null", b""),
            b"a}"
        );
    }
}
