//! etcd user/password authentication for the proxy's connections to etcd.
//!
//! etcd's `Authenticate` answers a token that every later request carries as its `token`
//! metadata. Tokens expire (a simple token after `--auth-token-ttl` unused on the member
//! that checks it, a JWT at its expiry), and a change of users or roles makes them stale:
//! etcd then answers `invalid auth token` (or `revision of auth store is old`, or `user name
//! is empty`), and [`AuthChannel`] authenticates again and sends the request once more, as
//! etcd's own Go client does. Streams (Watch, LeaseKeepAlive) cannot be replayed: they carry
//! the token they were opened with, and the watch forwarder reopens its stream when etcd
//! refuses a watch for a stale token.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Full};
use kine_proto::etcdserverpb::AuthenticateRequest;
use kine_proto::etcdserverpb::auth_client::AuthClient;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::{BoxError, Service, ServiceExt};

/// The metadata etcd reads the token from.
const TOKEN: &str = "token";

/// etcd's answers that mean "authenticate again" (the messages of `ErrGRPCInvalidAuthToken`,
/// `ErrGRPCAuthOldRevision`, `ErrGRPCUserEmpty`).
const STALE_TOKEN: [&str; 3] = [
    "etcdserver: invalid auth token",
    "etcdserver: revision of auth store is old",
    "etcdserver: user name is empty",
];

/// etcd's calls whose requests are streams: sent once, with the token of the moment.
const STREAMS: [&str; 2] = [
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseKeepAlive",
];

/// An etcd user and its password (from `etcd://USER:PASSWORD@HOST:PORT`). Its `Debug` never
/// shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    password: String,
}

impl Credentials {
    pub fn new(user: String, password: String) -> Self {
        Credentials { user, password }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// etcd's answer to wrong credentials (`ErrGRPCAuthFailed`).
const LOGIN_REFUSED: &str = "etcdserver: authentication failed, invalid user ID or password";

/// etcd's answer to `Authenticate` while authentication is off (`ErrGRPCAuthNotEnabled`):
/// requests then go without a token, as etcd's Go client sends them.
const AUTH_NOT_ENABLED: &str = "etcdserver: authentication is not enabled";

/// Whether etcd refused the credentials.
pub fn is_refused_login(message: &str) -> bool {
    message == LOGIN_REFUSED
}

/// Whether an etcd error means the token is stale (see [`STALE_TOKEN`]).
pub fn is_stale_token(message: &str) -> bool {
    STALE_TOKEN.contains(&message)
}

/// The current token of one set of credentials, shared by every connection to the cluster.
struct Session {
    credentials: Credentials,
    token: Mutex<Option<HeaderValue>>,
    /// Held while authenticating, so that many requests finding a stale token authenticate
    /// once.
    renewing: tokio::sync::Mutex<()>,
}

impl Session {
    fn current(&self) -> Option<HeaderValue> {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn token(&self, channel: &Channel) -> Result<HeaderValue, Status> {
        match self.current() {
            Some(token) => Ok(token),
            None => self.renew(channel, None).await,
        }
    }

    /// A new token, unless another request already replaced `stale`.
    async fn renew(
        &self,
        channel: &Channel,
        stale: Option<&HeaderValue>,
    ) -> Result<HeaderValue, Status> {
        let _renewing = self.renewing.lock().await;
        if let Some(current) = self.current()
            && Some(&current) != stale
        {
            return Ok(current);
        }
        let answer = AuthClient::new(channel.clone())
            .authenticate(AuthenticateRequest {
                name: self.credentials.user.clone(),
                password: self.credentials.password.clone(),
            })
            .await;
        let token = match answer {
            Ok(answer) => HeaderValue::from_str(&answer.into_inner().token)
                .map_err(|_| Status::internal("etcd answered an auth token that is not text"))?,
            // An empty token: if authentication is enabled later, etcd answers `user name
            // is empty` and this authenticates again.
            Err(status) if status.message() == AUTH_NOT_ENABLED => HeaderValue::from_static(""),
            Err(status) => return Err(status),
        };
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        Ok(token)
    }

    /// Forgets `stale`, so that the next request authenticates.
    fn forget(&self, stale: &HeaderValue) {
        let mut token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if token.as_ref() == Some(stale) {
            *token = None;
        }
    }
}

/// A channel to etcd that authenticates its requests when credentials are given, and is
/// the plain channel otherwise.
#[derive(Clone)]
pub struct AuthChannel {
    channel: Channel,
    session: Option<Arc<Session>>,
}

impl AuthChannel {
    pub fn new(channel: Channel, credentials: Option<Credentials>) -> Self {
        AuthChannel {
            channel,
            session: credentials.map(|credentials| {
                Arc::new(Session {
                    credentials,
                    token: Mutex::new(None),
                    renewing: tokio::sync::Mutex::new(()),
                })
            }),
        }
    }

    /// Makes the next request authenticate again (a watch was refused for a stale token).
    pub fn forget_token(&self) {
        if let Some(session) = &self.session
            && let Some(token) = session.current()
        {
            session.forget(&token);
        }
    }

    pub fn authenticates(&self) -> bool {
        self.session.is_some()
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send + 'static>>;

impl Service<http::Request<Body>> for AuthChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::poll_ready(&mut self.channel, cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The channel polled ready serves this call; the clone left behind is polled next.
        let fresh = self.channel.clone();
        let mut channel = std::mem::replace(&mut self.channel, fresh);
        let Some(session) = self.session.clone() else {
            let response = channel.call(request);
            return Box::pin(async move { response.await.map_err(Into::into) });
        };
        Box::pin(authenticated(channel, session, request))
    }
}

async fn authenticated(
    mut channel: Channel,
    session: Arc<Session>,
    mut request: http::Request<Body>,
) -> Result<http::Response<Body>, BoxError> {
    let token = match session.token(&channel).await {
        Ok(token) => token,
        Err(status) => return Ok(status.into_http()),
    };
    if STREAMS.contains(&request.uri().path()) {
        request.headers_mut().insert(TOKEN, token);
        return Ok(channel.ready().await?.call(request).await?);
    }
    // A unary request is one small message: kept, so it can be sent again with a new token.
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let copy = |token: HeaderValue| {
        let mut request = http::Request::new(Body::new(Full::<Bytes>::new(body.clone())));
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = parts.uri.clone();
        *request.version_mut() = parts.version;
        *request.headers_mut() = parts.headers.clone();
        request.headers_mut().insert(TOKEN, token);
        request
    };
    let response = channel.ready().await?.call(copy(token.clone())).await?;
    if !answers_stale_token(&response) {
        return Ok(response);
    }
    let token = match session.renew(&channel, Some(&token)).await {
        Ok(token) => token,
        Err(status) => return Ok(status.into_http()),
    };
    Ok(channel.ready().await?.call(copy(token)).await?)
}

/// Whether etcd refused a request for its token (an error answered in the headers, as etcd
/// answers a request it refuses before running it). The messages compared need no
/// %-escapes, so the header is compared as sent.
fn answers_stale_token(response: &http::Response<Body>) -> bool {
    let headers = response.headers();
    headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() != b"0")
        && headers
            .get("grpc-message")
            .and_then(|message| message.to_str().ok())
            .is_some_and(is_stale_token)
}
