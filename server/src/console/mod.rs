//! The web console: the admin's pages in the browser, served on a port of their own.
//!
//! The page, its script and its style sheet are built into the binary (no framework, no
//! download at run time). Everything the page shows or does goes through a small JSON
//! API whose calls are the admin protocol's own messages, answered by
//! [`connection::answer_admin`] exactly as for `changeover-agent admin`: nothing is
//! console-only. Live progress comes as server-sent events from the same broadcast the
//! admin command line follows.
//!
//! | request | answer |
//! |---|---|
//! | `GET /console/` (and its `console.js`, `console.css`) | the page; readable without login, it holds nothing of the site |
//! | `POST /console/api/login` `{"password": …}` | `{"csrf": …}` and the session cookie; 401 wrong password, 429 throttled |
//! | `GET /console/api/session` | `{"csrf": …}` for a live session cookie, else 401 |
//! | `POST /console/api/call` an admin message (`status_request`, `update_request`, `cancel_request`, `download_request`) | the server's answer (`status`, `update_accepted`, `error`, …) |
//! | `GET /console/api/events` | `text/event-stream`: each admin event as `data: <json>` |
//! | `POST /console/api/logout` | ends the session |
//!
//! Every POST must come from the console's own origin (`Origin`, when the browser sends
//! it) and, but for the login, carry the session's CSRF token in `X-CSRF-Token`. Bodies are
//! capped at [`MAX_BODY`], connections at [`MAX_CONNECTIONS`] (more wait in the backlog),
//! and a connection that sends no complete request head within [`HEADER_TIMEOUT`] is
//! closed, also between keep-alive requests.

pub mod sessions;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use changeover_protocol::ClientMessage;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::sync::broadcast::error::RecvError;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::audit::{Actor, Via};
use crate::auth::LoginOutcome;
use crate::connection::{self, ConnectionContext};
use sessions::Sessions;

/// The session cookie's name.
pub const COOKIE: &str = "changeover_console";
/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The largest request body taken.
pub const MAX_BODY: usize = 16 * 1024;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Time for a request head to arrive (and for the TLS handshake, under TLS).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a request body to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// An event stream sends a comment this often, so proxies and the page see it is alive.
const EVENTS_PING: Duration = Duration::from_secs(15);

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

type Body = BoxBody<Bytes, Infallible>;

/// A request turned away: the answer that says why (boxed: a response is large).
type Refusal = Box<Response<Body>>;

/// Where the console listens: `server.listen`'s address on the next port (`auto`, the
/// default), an address of its own, or nowhere (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleListen {
    Off,
    Auto,
    At(SocketAddr),
}

impl std::str::FromStr for ConsoleListen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "off" | "" => Ok(ConsoleListen::Off),
            "auto" => Ok(ConsoleListen::Auto),
            other => other.parse().map(ConsoleListen::At).map_err(|err| {
                format!(
                    "{other:?} is not \"auto\", \"off\" or an address such as 0.0.0.0:7601: {err}"
                )
            }),
        }
    }
}

impl ConsoleListen {
    /// The address to bind, given the server's own listening address: `auto` takes the
    /// next port (or any free port when the server's is chosen by the system).
    pub fn address(self, server: SocketAddr) -> Option<SocketAddr> {
        match self {
            ConsoleListen::Off => None,
            ConsoleListen::At(address) => Some(address),
            ConsoleListen::Auto => {
                let port = match server.port() {
                    0 | u16::MAX => 0,
                    port => port + 1,
                };
                Some(SocketAddr::new(server.ip(), port))
            }
        }
    }
}

/// The URL a browser opens for a console bound to `bound`.
pub fn url(bound: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = if bound.ip().is_unspecified() {
        // Reachable under every address of the machine; name the loopback one.
        match bound {
            SocketAddr::V4(_) => format!("127.0.0.1:{}", bound.port()),
            SocketAddr::V6(_) => format!("[::1]:{}", bound.port()),
        }
    } else {
        bound.to_string()
    };
    format!("{scheme}://{host}/console/")
}

/// The console of one server.
pub struct Console {
    context: Arc<ConnectionContext>,
    sessions: Arc<Sessions>,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Console")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Console {
    pub fn new(context: Arc<ConnectionContext>, tls: Option<TlsAcceptor>) -> Console {
        Console {
            sessions: Arc::new(Sessions::load(&context.state_dir)),
            context,
            tls,
        }
    }

    /// Serves `listener` until `shutdown`.
    pub fn spawn(
        self: Arc<Self>,
        listener: TcpListener,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) {
        let connections = tracker.clone();
        tracker.spawn(self.accept_loop(listener, connections, shutdown));
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => return,
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_closed) => return,
                },
            };
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of descriptors, usually: let some go before the next try.
                        debug!(cause = %err, "console accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if let Err(err) = crate::platform::keep_from_children(&stream) {
                debug!(cause = %err, "cannot keep the console connection from child processes");
            }
            let console = Arc::clone(&self);
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let _permit = permit;
                console.serve_connection(stream, peer, shutdown).await;
            });
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        match self.tls.clone() {
            None => self.serve_http(stream, peer, shutdown).await,
            Some(acceptor) => {
                match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => self.serve_http(stream, peer, shutdown).await,
                    Ok(Err(err)) => debug!(%peer, cause = %err, "console TLS handshake failed"),
                    Err(_elapsed) => debug!(%peer, "console TLS handshake timed out"),
                }
            }
        }
    }

    async fn serve_http<S>(
        self: Arc<Self>,
        stream: S,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let console = Arc::clone(&self);
        let stopping = shutdown.clone();
        let service = hyper::service::service_fn(move |request| {
            let console = Arc::clone(&console);
            let stopping = stopping.clone();
            async move { Ok::<_, Infallible>(console.handle(request, peer, stopping).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(err) = served {
                    debug!(%peer, cause = %err, "console connection ended");
                }
            }
            () = shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
            }
        }
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Response<Body> {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        let mut response = match (method, path.as_str()) {
            (Method::GET | Method::HEAD, "/" | "/console") => redirect("/console/"),
            (Method::GET | Method::HEAD, "/console/" | "/console/index.html") => {
                asset(INDEX_HTML, "text/html; charset=utf-8")
            }
            (Method::GET | Method::HEAD, "/console/console.js") => {
                asset(CONSOLE_JS, "text/javascript; charset=utf-8")
            }
            (Method::GET | Method::HEAD, "/console/console.css") => {
                asset(CONSOLE_CSS, "text/css; charset=utf-8")
            }
            (Method::POST, "/console/api/login") => self.login(request, peer).await,
            (Method::POST, "/console/api/logout") => self.logout(&request, peer).await,
            (Method::GET, "/console/api/session") => match self.session_of(request.headers()) {
                Some(session) => json(StatusCode::OK, &serde_json::json!({ "csrf": session.csrf })),
                None => not_logged_in(),
            },
            (Method::POST, "/console/api/call") => self.call(request, peer).await,
            (Method::GET, "/console/api/events") => self.events(&request, shutdown),
            (
                _,
                "/"
                | "/console"
                | "/console/"
                | "/console/index.html"
                | "/console/console.js"
                | "/console/console.css"
                | "/console/api/login"
                | "/console/api/logout"
                | "/console/api/session"
                | "/console/api/call"
                | "/console/api/events",
            ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
            _ => error(StatusCode::NOT_FOUND, "no such page"),
        };
        secure_headers(response.headers_mut());
        response
    }

    async fn login(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if let Err(refusal) = same_origin(request.headers()) {
            return *refusal;
        }
        #[derive(Deserialize)]
        struct Login {
            password: String,
        }
        let login: Login = match read_json(request).await {
            Ok(login) => login,
            Err(refusal) => return *refusal,
        };
        let actor = Actor {
            address: peer.ip(),
            via: Via::Console,
        };
        match connection::log_in(&self.context, actor, login.password).await {
            LoginOutcome::Accepted => {
                info!(%peer, "admin logged in to the console");
                let session = self.sessions.create(peer.ip());
                let mut response =
                    json(StatusCode::OK, &serde_json::json!({ "csrf": session.csrf }));
                let cookie = format!(
                    "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/console; Max-Age={}{}",
                    session.token,
                    sessions::LIFETIME.as_secs(),
                    if self.tls.is_some() { "; Secure" } else { "" },
                );
                if let Ok(value) = HeaderValue::from_str(&cookie) {
                    response.headers_mut().insert(header::SET_COOKIE, value);
                }
                response
            }
            LoginOutcome::WrongPassword => error(StatusCode::UNAUTHORIZED, "wrong admin password"),
            LoginOutcome::Throttled { retry_after } => throttled(
                retry_after,
                &format!("too many failed logins from {}", peer.ip()),
            ),
            LoginOutcome::Busy { retry_after } => {
                throttled(retry_after, "too many logins are waiting to be checked")
            }
        }
    }

    async fn logout(&self, request: &Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let session = match self.authorized(request.headers()) {
            Ok(session) => session,
            Err(refusal) => return *refusal,
        };
        self.sessions.remove(&session.token);
        let actor = Actor {
            address: peer.ip(),
            via: Via::Console,
        };
        self.context
            .audit
            .record(actor, "logout", None, Ok(()))
            .await;
        let mut response = json(StatusCode::OK, &serde_json::json!({ "logged_out": true }));
        let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/console; Max-Age=0");
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        response
    }

    async fn call(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if let Err(refusal) = self.authorized(request.headers()) {
            return *refusal;
        }
        let message: ClientMessage = match read_json(request).await {
            Ok(message) => message,
            Err(refusal) => return *refusal,
        };
        let actor = Actor {
            address: peer.ip(),
            via: Via::Console,
        };
        match connection::answer_admin(&self.context, actor, message).await {
            Some(answer) => json(StatusCode::OK, &answer),
            None => error(
                StatusCode::BAD_REQUEST,
                "not an admin request: status_request, update_request, cancel_request or download_request",
            ),
        }
    }

    fn events(&self, request: &Request<Incoming>, shutdown: CancellationToken) -> Response<Body> {
        let Some(session) = self.session_of(request.headers()) else {
            return not_logged_in();
        };
        struct Follow {
            events: tokio::sync::broadcast::Receiver<tokio_tungstenite::tungstenite::Utf8Bytes>,
            ping: tokio::time::Interval,
            shutdown: CancellationToken,
            token: String,
            sessions: Arc<Sessions>,
            opened: bool,
        }
        let mut ping = tokio::time::interval(EVENTS_PING);
        ping.reset();
        let follow = Follow {
            events: self.context.releases.subscribe_events(),
            ping,
            shutdown,
            token: session.token,
            sessions: Arc::clone(&self.sessions),
            opened: false,
        };
        let stream = futures_util::stream::unfold(follow, |mut follow| async move {
            if !follow.opened {
                // Sent at once, so the browser knows the stream is open; after a lost
                // connection (the server's restart) it tries again a second later.
                follow.opened = true;
                let hello = Bytes::from_static(b"retry: 1000\n: connected\n\n");
                return Some((Ok(Frame::data(hello)), follow));
            }
            let chunk = tokio::select! {
                () = follow.shutdown.cancelled() => return None,
                _ = follow.ping.tick() => {
                    // A session that ended (logout, expiry) ends its stream too.
                    follow.sessions.check(&follow.token)?;
                    Bytes::from_static(b": alive\n\n")
                }
                event = follow.events.recv() => match event {
                    Ok(event) => Bytes::from(format!("data: {}\n\n", event.as_str())),
                    // The page reads the status again after a gap.
                    Err(RecvError::Lagged(missed)) => Bytes::from(format!("event: lagged\ndata: {missed}\n\n")),
                    Err(RecvError::Closed) => return None,
                },
            };
            Some((Ok::<_, Infallible>(Frame::data(chunk)), follow))
        });
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    /// The live session the request's cookie names, with its CSRF token checked.
    fn authorized(&self, headers: &HeaderMap) -> Result<LiveSession, Refusal> {
        same_origin(headers)?;
        let session = self
            .session_of(headers)
            .ok_or_else(|| Box::new(not_logged_in()))?;
        let given = headers
            .get(CSRF_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !sessions::same_token(given, &session.csrf) {
            return Err(Box::new(error(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token: reload the console",
            )));
        }
        Ok(session)
    }

    fn session_of(&self, headers: &HeaderMap) -> Option<LiveSession> {
        let token = cookie(headers, COOKIE)?;
        let csrf = self.sessions.check(&token)?;
        Some(LiveSession { token, csrf })
    }
}

#[derive(Debug)]
struct LiveSession {
    token: String,
    csrf: String,
}

/// The value of the cookie `name`, from any `Cookie` header.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

/// Refuses a request the browser says comes from another site: by `Origin` (which must
/// name the host the request was sent to) or `Sec-Fetch-Site`.
fn same_origin(headers: &HeaderMap) -> Result<(), Refusal> {
    let refuse = || Box::new(error(StatusCode::FORBIDDEN, "cross-site request refused"));
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return Err(refuse());
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|origin| origin.split_once("://"))
        .map(|(_, host)| host);
    match (origin_host, host) {
        (Some(origin_host), Some(host)) if origin_host.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err(refuse()),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, Refusal> {
    let body = Limited::new(request.into_body(), MAX_BODY);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
            return Err(Box::new(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the body is larger than {MAX_BODY} bytes"),
            )));
        }
        Ok(Err(err)) => {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {err}"),
            )));
        }
        Err(_elapsed) => {
            return Err(Box::new(error(
                StatusCode::REQUEST_TIMEOUT,
                "the body was too slow",
            )));
        }
    };
    serde_json::from_slice(&bytes).map_err(|err| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("not the expected JSON: {err}"),
        ))
    })
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.status_mut() = StatusCode::FOUND;
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    response
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

fn not_logged_in() -> Response<Body> {
    error(StatusCode::UNAUTHORIZED, "not logged in")
}

fn throttled(retry_after: Duration, why: &str) -> Response<Body> {
    let seconds = retry_after.as_secs().max(1);
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("{why}; try again in {seconds} s"),
    );
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

fn secure_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// Binds the console's socket; a failure leaves the server running without a console.
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    crate::listener::bind(address, 128)
}

/// Binds the console for a server listening on `server`, or logs why it cannot. With
/// `auto`, a next port that another program holds gives way to any free port: the URL is
/// printed either way, and a console somewhere beats none.
pub fn bind_for(listen: ConsoleListen, server: SocketAddr) -> Option<TcpListener> {
    let address = listen.address(server)?;
    match bind(address) {
        Ok(listener) => Some(listener),
        Err(err)
            if listen == ConsoleListen::Auto
                && address.port() != 0
                && err.kind() == std::io::ErrorKind::AddrInUse =>
        {
            let any_port = SocketAddr::new(address.ip(), 0);
            warn!(%address, "the console's usual port is taken; it gets a free one");
            bind(any_port)
                .map_err(|err| report_bind_failure(any_port, &err))
                .ok()
        }
        Err(err) => {
            report_bind_failure(address, &err);
            None
        }
    }
}

/// Logs that the console could not be bound, and why.
fn report_bind_failure(address: SocketAddr, err: &std::io::Error) {
    warn!(%address, cause = %err, "cannot serve the web console; the server runs without it");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (key, value) in pairs {
            map.append(*key, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn auto_takes_the_next_port_or_any_port() {
        let server: SocketAddr = "0.0.0.0:7600".parse().unwrap();
        assert_eq!(
            ConsoleListen::Auto.address(server),
            Some("0.0.0.0:7601".parse().unwrap())
        );
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(ConsoleListen::Auto.address(any), Some(any));
        assert_eq!(ConsoleListen::Off.address(server), None);
        assert_eq!("off".parse(), Ok(ConsoleListen::Off));
        assert_eq!(
            "10.0.0.1:8080".parse(),
            Ok(ConsoleListen::At("10.0.0.1:8080".parse().unwrap()))
        );
        assert!("elsewhere".parse::<ConsoleListen>().is_err());
    }

    #[tokio::test]
    async fn auto_takes_a_free_port_when_the_next_one_is_held() {
        let holder = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let held = holder.local_addr().unwrap();
        let server = SocketAddr::new(held.ip(), held.port() - 1);
        let console = bind_for(ConsoleListen::Auto, server).expect("a console on a free port");
        let port = console.local_addr().unwrap().port();
        assert_ne!(port, held.port());
        assert_ne!(port, 0);
        // An address the admin chose is not swapped for another.
        assert!(bind_for(ConsoleListen::At(held), server).is_none());
    }

    #[test]
    fn the_url_names_a_reachable_host() {
        assert_eq!(
            url("0.0.0.0:7601".parse().unwrap(), false),
            "http://127.0.0.1:7601/console/"
        );
        assert_eq!(
            url("10.1.2.3:7601".parse().unwrap(), true),
            "https://10.1.2.3:7601/console/"
        );
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let map = headers(&[("cookie", "a=1; changeover_console=abc; b=2")]);
        assert_eq!(cookie(&map, COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&headers(&[("cookie", "x=1")]), COOKIE), None);
    }

    #[test]
    fn cross_site_posts_are_refused() {
        assert!(same_origin(&headers(&[])).is_ok());
        assert!(
            same_origin(&headers(&[
                ("host", "127.0.0.1:7601"),
                ("origin", "http://127.0.0.1:7601")
            ]))
            .is_ok()
        );
        assert!(
            same_origin(&headers(&[
                ("host", "127.0.0.1:7601"),
                ("origin", "http://evil.example")
            ]))
            .is_err()
        );
        assert!(same_origin(&headers(&[("origin", "null")])).is_err());
        assert!(same_origin(&headers(&[("sec-fetch-site", "cross-site")])).is_err());
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])).is_ok());
    }
}
