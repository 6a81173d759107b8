//! The endpoint: dialling with pinned keys, accepting with an authorizer,
//! one request per bidirectional stream, one cached connection per peer.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::{SigningKey, VerifyingKey};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, RecvStream, SendStream, TransportConfig, VarInt};
use rustls::sign::CertifiedKey;
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::debug;

use crate::frame::{self, read_frame, write_frame};
use crate::{codes, tls, NetError, MAX_FRAME};

/// Server name given to rustls when dialling. SNI is disabled, so it never
/// leaves the process; the peer is identified by its pinned key, not by name.
const SERVER_NAME: &str = "dbqs.invalid";

/// Tuning knobs of an [`Endpoint`]. `Default` suits 1 MiB messages on a LAN.
#[derive(Clone, Debug)]
pub struct TransportOptions {
    /// Largest frame (message) accepted or sent, in bytes.
    pub max_frame: u32,
    /// Bound on establishing a connection, handshake included.
    pub connect_timeout: Duration,
    /// Bound on one request: opening the stream, sending the request and
    /// receiving the (first) response frame. Each further frame of a streamed
    /// response gets the same bound again. On the serving side it bounds
    /// receiving a request.
    pub request_timeout: Duration,
    /// A connection with no traffic at all for this long is dropped.
    pub idle_timeout: Duration,
    /// Interval of keep-alive packets on open connections; keep it well below
    /// `idle_timeout`.
    pub keep_alive_interval: Duration,
    /// Requests a peer may have in flight on one connection to us; further
    /// ones wait for a slot. Worst-case memory per incoming connection is about
    /// `max_concurrent_streams * max_frame`.
    pub max_concurrent_streams: u32,
    /// Flow-control window of a whole connection, in each direction, in bytes.
    pub connection_window: u64,
    /// The budget of peers the [`Authorizer`] does not trust.
    pub strangers: StrangerLimits,
}

/// What peers that the [`Authorizer`] does not trust may use, all of them together.
///
/// A stranger's connection starts with room for one frame in flight (its flow-control window)
/// and `max_streams` streams; a request of a stranger is read only while it holds one of
/// `max_receiving` slots, and must arrive whole within `request_timeout`. So strangers hold at
/// most about `(max_connections + max_receiving) * max_frame` bytes of ours at any time (about
/// 84 MiB with the defaults), and a slow sender is cut off. A connection whose peer becomes
/// trusted (a joining node admitted) gets the full budget at its next stream.
#[derive(Clone, Debug)]
pub struct StrangerLimits {
    /// Connections from untrusted keys at once, in all; more are closed with
    /// [`crate::codes::CLOSE_BUSY`].
    pub max_connections: usize,
    /// Connections from one untrusted key at once.
    pub max_connections_per_key: usize,
    /// Streams an untrusted peer may have open on one connection.
    pub max_streams: u32,
    /// Requests of untrusted peers being received at once, in all.
    pub max_receiving: usize,
    /// An untrusted peer's request must be received whole within this (waiting for a slot
    /// included); otherwise its stream is aborted with [`crate::codes::STREAM_BUSY`].
    pub request_timeout: Duration,
}

impl Default for StrangerLimits {
    fn default() -> Self {
        StrangerLimits {
            max_connections: 32,
            max_connections_per_key: 4,
            max_streams: 4,
            max_receiving: 8,
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            max_frame: MAX_FRAME,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Duration::from_secs(10),
            max_concurrent_streams: 64,
            connection_window: 32 * 1024 * 1024,
            strangers: StrangerLimits::default(),
        }
    }
}

impl TransportOptions {
    /// One whole frame fits in a stream's window, so a request never waits for a window update.
    fn stream_window(&self) -> u64 {
        (u64::from(self.max_frame) + frame::HEADER_LEN as u64).max(64 * 1024)
    }

    /// The quinn transport parameters. Connections we accept start with a stranger's budget
    /// (one frame's window, `strangers.max_streams` streams), raised once the peer is known to
    /// be trusted; `accept_streams` is false for connections we dial, on which the peer has no
    /// business opening streams.
    fn transport_config(&self, accept_streams: bool) -> TransportConfig {
        let stream_window = self.stream_window();
        let (streams, connection_window) = if accept_streams {
            (self.strangers.max_streams, stream_window)
        } else {
            (0, self.connection_window.max(stream_window))
        };
        let mut t = TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(varint(stream_window))
            .receive_window(varint(connection_window))
            .send_window(self.connection_window.max(stream_window))
            .datagram_receive_buffer_size(None)
            .keep_alive_interval(Some(self.keep_alive_interval))
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok());
        t
    }
}

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).unwrap_or(VarInt::MAX)
}

/// Decides whether an authenticated peer may use this endpoint.
///
/// Asked when a connection is accepted and again for every request on it, so
/// an answer that changes (an epoch change removing a member) takes effect on
/// existing connections too. Must be quick: it runs on the accept path.
pub trait Authorizer: Send + Sync + 'static {
    /// `true` if `peer` may send requests to us.
    fn is_authorized(&self, peer: &VerifyingKey) -> bool;

    /// `true` if `peer` gets the full budget of [`TransportOptions`]; others share the
    /// strangers' ([`StrangerLimits`]). Asked when a connection is accepted and at each stream
    /// until it says yes.
    fn is_trusted(&self, _peer: &VerifyingKey) -> bool {
        true
    }
}

impl<F> Authorizer for F
where
    F: Fn(&VerifyingKey) -> bool + Send + Sync + 'static,
{
    fn is_authorized(&self, peer: &VerifyingKey) -> bool {
        self(peer)
    }
}

/// Application logic behind [`Endpoint::serve`].
///
/// Requests arrive concurrently, one task per request. `peer` is the
/// authenticated (and authorized) node key of the sender; `request` is raw,
/// untrusted bytes. Closures `Fn(VerifyingKey, Vec<u8>) -> impl Future<Output =
/// Option<Vec<u8>>>` implement this trait.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request with one frame; `None` closes the stream without an
    /// answer (the requester gets [`NetError::NoResponse`]).
    fn handle(
        &self,
        peer: VerifyingKey,
        request: Vec<u8>,
    ) -> impl Future<Output = Option<Vec<u8>>> + Send;

    /// Answers one request with any number of frames written to `out`; the
    /// stream is finished when this returns `Ok`, and reset on `Err`.
    ///
    /// The default sends what [`Handler::handle`] returns. Override it to
    /// stream bulk data (read with [`Endpoint::request_stream`]).
    fn handle_stream<'a>(
        &'a self,
        peer: VerifyingKey,
        request: Vec<u8>,
        out: &'a mut Responder,
    ) -> impl Future<Output = Result<(), NetError>> + Send + 'a {
        async move {
            if let Some(response) = self.handle(peer, request).await {
                out.send_owned(response).await?;
            }
            Ok(())
        }
    }
}

impl<F, Fut> Handler for F
where
    F: Fn(VerifyingKey, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Vec<u8>>> + Send,
{
    fn handle(
        &self,
        peer: VerifyingKey,
        request: Vec<u8>,
    ) -> impl Future<Output = Option<Vec<u8>>> + Send {
        self(peer, request)
    }
}

/// The sending half of a request's stream, given to [`Handler::handle_stream`].
#[derive(Debug)]
pub struct Responder {
    send: SendStream,
    max_frame: u32,
}

impl Responder {
    /// Sends one response frame (at most `max_frame` bytes).
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        self.send_owned(frame.to_vec()).await
    }

    /// [`Responder::send`] without copying the frame.
    pub async fn send_owned(&mut self, frame: Vec<u8>) -> Result<(), NetError> {
        write_frame(&mut self.send, Bytes::from(frame), self.max_frame).await
    }
}

/// The response frames of one request, from [`Endpoint::request_stream`].
///
/// Dropping it cancels the request (the server's handler is told to stop).
#[derive(Debug)]
pub struct ResponseStream {
    recv: RecvStream,
    max_frame: u32,
    timeout: Duration,
    /// Deadline of the first frame: the rest of the request's time budget.
    first_deadline: Option<Instant>,
    done: bool,
}

impl ResponseStream {
    /// The next response frame, or `None` once the responder has finished.
    ///
    /// Each frame must arrive within the request timeout.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, NetError> {
        if self.done {
            return Ok(None);
        }
        let deadline = self
            .first_deadline
            .take()
            .unwrap_or_else(|| Instant::now() + self.timeout);
        let result = match timeout_at(deadline, read_frame(&mut self.recv, self.max_frame)).await {
            Ok(result) => result,
            Err(_) => Err(NetError::Timeout),
        };
        match &result {
            Ok(Some(_)) => {}
            Ok(None) => self.done = true,
            Err(e) => {
                self.done = true;
                let code = match e {
                    NetError::FrameTooLarge { .. } => codes::STREAM_FRAME_TOO_LARGE,
                    _ => codes::STREAM_CANCELLED,
                };
                let _ = self.recv.stop(VarInt::from_u32(code));
            }
        }
        result
    }
}

type ConnSlot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

struct Inner {
    quic: quinn::Endpoint,
    local_addr: SocketAddr,
    key: VerifyingKey,
    identity: Arc<CertifiedKey>,
    opts: Arc<TransportOptions>,
    /// Transport parameters of the connections we dial.
    dial_transport: Arc<TransportConfig>,
    /// `None` for client-only endpoints, which accept nothing.
    authorizer: Option<Arc<dyn Authorizer>>,
    /// One connection per (peer key, address); the async lock serialises dials.
    conns: Mutex<HashMap<([u8; 32], SocketAddr), ConnSlot>>,
    strangers: Arc<Strangers>,
}

/// What untrusted peers hold of [`StrangerLimits`] now.
struct Strangers {
    /// Open connections by key.
    conns: Mutex<HashMap<[u8; 32], usize>>,
    receiving: Arc<tokio::sync::Semaphore>,
}

impl Strangers {
    /// A connection slot for `peer`, or `None` when the budget is spent.
    fn admit(
        self: &Arc<Self>,
        peer: &VerifyingKey,
        limits: &StrangerLimits,
    ) -> Option<StrangerSlot> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = conns.values().sum();
        let mine = conns.entry(peer.to_bytes()).or_default();
        if total >= limits.max_connections || *mine >= limits.max_connections_per_key {
            if *mine == 0 {
                conns.remove(&peer.to_bytes());
            }
            return None;
        }
        *mine += 1;
        Some(StrangerSlot {
            strangers: self.clone(),
            key: peer.to_bytes(),
        })
    }
}

/// An untrusted peer's connection, counted until dropped.
struct StrangerSlot {
    strangers: Arc<Strangers>,
    key: [u8; 32],
}

impl Drop for StrangerSlot {
    fn drop(&mut self) {
        let mut conns = self
            .strangers
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = conns.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                conns.remove(&self.key);
            }
        }
    }
}

impl Inner {
    fn conns(&self) -> MutexGuard<'_, HashMap<([u8; 32], SocketAddr), ConnSlot>> {
        // The map stays consistent even if a holder panicked: entries are
        // only inserted or cleared whole.
        self.conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A QUIC endpoint identified by an ed25519 node key. Cheap to clone.
///
/// It dials peers ([`Endpoint::request`]) and, if built with
/// [`Endpoint::server`], answers them ([`Endpoint::serve`]). Must be created
/// inside a tokio runtime.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.inner.local_addr)
            .field("key", &self.inner.key)
            .field("serves", &self.inner.authorizer.is_some())
            .finish_non_exhaustive()
    }
}

/// The local address a client-only endpoint should bind to reach `target`:
/// the loopback address of the same family for a loopback target, else the
/// wildcard address of that family; port 0 in both cases.
pub fn local_bind_for(target: SocketAddr) -> SocketAddr {
    let ip = match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(ip) if ip.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// The key of a listening node's stateless resets (RFC 9000 §10.3), derived from its node key so
/// that it is the same after a restart. A peer that still holds a connection to the node's
/// previous process sends on it; the restarted node cannot decrypt that, answers with a stateless
/// reset whose token the previous process had issued from the same key, and the peer drops the
/// connection at once and dials afresh. With a random key per process (quinn's default) the peer
/// would wait for its request or idle timeout (30 s) before noticing. The connection ids' hash key
/// is derived the same way, for the same reason.
struct ResetKey([u8; 32]);

impl ResetKey {
    fn of(key: &SigningKey) -> ResetKey {
        ResetKey(blake3::derive_key(
            "dbqsfs 2026-12 quic stateless reset key",
            key.as_bytes(),
        ))
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = blake3::keyed_hash(&self.0, data);
        let n = signature_out.len().min(32);
        signature_out[..n].copy_from_slice(&mac.as_bytes()[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        // `blake3::Hash` compares in constant time.
        let mac = blake3::keyed_hash(&self.0, data);
        match <[u8; 32]>::try_from(signature) {
            Ok(sig) if blake3::Hash::from(sig) == mac => Ok(()),
            _ => Err(quinn::crypto::CryptoError),
        }
    }
}

impl Endpoint {
    /// An endpoint that accepts connections on `bind` (and can dial).
    ///
    /// Incoming peers are authenticated by their node key and then admitted by
    /// `authorizer`; call [`Endpoint::serve`] to start answering requests.
    pub fn server(
        bind: SocketAddr,
        key: SigningKey,
        opts: TransportOptions,
        authorizer: Arc<dyn Authorizer>,
    ) -> Result<Self, NetError> {
        let identity = tls::certified_key(&key);
        let tls = tls::server_config(identity.clone())?;
        let crypto = QuicServerConfig::try_from(tls)
            .map_err(|e| NetError::Tls(rustls::Error::General(e.to_string())))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(opts.transport_config(true)));
        let socket = std::net::UdpSocket::bind(bind)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| std::io::Error::other("no async runtime found"))?;
        let reset = ResetKey::of(&key);
        let cid_key = u64::from_le_bytes(reset.0[..8].try_into().expect("8 bytes"));
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset));
        // Connection ids are checked with a keyed hash before anything else: with a key of its
        // own, a restarted node would drop the packets of old connections as invalid instead of
        // answering them with a stateless reset.
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let quic = quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime)?;
        Self::new(quic, key, identity, opts, Some(authorizer))
    }

    /// A dial-only endpoint bound to `bind` (see [`local_bind_for`]).
    pub fn client(
        bind: SocketAddr,
        key: SigningKey,
        opts: TransportOptions,
    ) -> Result<Self, NetError> {
        let identity = tls::certified_key(&key);
        let quic = quinn::Endpoint::client(bind)?;
        Self::new(quic, key, identity, opts, None)
    }

    fn new(
        quic: quinn::Endpoint,
        key: SigningKey,
        identity: Arc<CertifiedKey>,
        opts: TransportOptions,
        authorizer: Option<Arc<dyn Authorizer>>,
    ) -> Result<Self, NetError> {
        let local_addr = quic.local_addr()?;
        let dial_transport = Arc::new(opts.transport_config(false));
        let strangers = Arc::new(Strangers {
            conns: Mutex::new(HashMap::new()),
            receiving: Arc::new(tokio::sync::Semaphore::new(opts.strangers.max_receiving)),
        });
        Ok(Endpoint {
            inner: Arc::new(Inner {
                quic,
                local_addr,
                key: key.verifying_key(),
                identity,
                opts: Arc::new(opts),
                dial_transport,
                authorizer,
                conns: Mutex::new(HashMap::new()),
                strangers,
            }),
        })
    }

    /// The UDP address this endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This endpoint's node key, as peers see it.
    pub fn key(&self) -> VerifyingKey {
        self.inner.key
    }

    /// Sends `msg` to the node with key `peer` at `addr` and returns its answer.
    ///
    /// The connection is reused across requests and re-dialled if it was
    /// closed. The handshake fails with [`NetError::WrongPeerKey`] unless the
    /// node at `addr` proves it holds `peer`. If the server answers with
    /// several frames, this returns the first.
    pub async fn request(
        &self,
        addr: SocketAddr,
        peer: &VerifyingKey,
        msg: &[u8],
    ) -> Result<Vec<u8>, NetError> {
        self.request_shared(addr, peer, Bytes::copy_from_slice(msg))
            .await
    }

    /// [`Endpoint::request`] with a message that is not copied: one message sent to several
    /// peers is shared by all of its sends.
    pub async fn request_shared(
        &self,
        addr: SocketAddr,
        peer: &VerifyingKey,
        msg: Bytes,
    ) -> Result<Vec<u8>, NetError> {
        let result = async {
            let mut responses = self.request_stream_shared(addr, peer, msg).await?;
            responses.next().await?.ok_or(NetError::NoResponse)
        }
        .await;
        if matches!(result, Err(NetError::Timeout)) {
            // A peer that was killed leaves a connection that looks open until its idle timeout;
            // drop it so the next request dials afresh (a restarted peer is used at once).
            self.drop_cached(addr, peer).await;
        }
        result
    }

    /// Closes and forgets the cached connection to `peer` at `addr`, if any.
    async fn drop_cached(&self, addr: SocketAddr, peer: &VerifyingKey) {
        let slot = self.inner.conns().get(&(peer.to_bytes(), addr)).cloned();
        if let Some(slot) = slot {
            if let Some(conn) = slot.lock().await.take() {
                debug!(%addr, "request timed out: dropping the cached connection");
                conn.close(VarInt::from_u32(codes::CLOSE_SUSPECT), b"request timed out");
            }
        }
    }

    /// Like [`Endpoint::request`], but returns all response frames as a stream
    /// (for responses written with [`Responder::send`] several times).
    pub async fn request_stream(
        &self,
        addr: SocketAddr,
        peer: &VerifyingKey,
        msg: &[u8],
    ) -> Result<ResponseStream, NetError> {
        self.request_stream_shared(addr, peer, Bytes::copy_from_slice(msg))
            .await
    }

    async fn request_stream_shared(
        &self,
        addr: SocketAddr,
        peer: &VerifyingKey,
        msg: Bytes,
    ) -> Result<ResponseStream, NetError> {
        let opts = &self.inner.opts;
        frame::check_len(msg.len(), opts.max_frame)?;
        let conn = self.connection(addr, peer).await?;
        let deadline = Instant::now() + opts.request_timeout;
        let (mut send, mut recv) = match timeout_at(deadline, conn.open_bi()).await {
            Err(_) => return Err(NetError::Timeout),
            Ok(Ok(streams)) => streams,
            // The cached connection died before anything was sent on it: one
            // fresh dial is safe, the request cannot have been delivered.
            Ok(Err(e)) => match NetError::from_connection(e) {
                NetError::ConnectionLost(e) => {
                    debug!(%addr, "cached connection lost ({e}), re-dialling");
                    let conn = self.connection(addr, peer).await?;
                    timeout_at(deadline, conn.open_bi())
                        .await
                        .map_err(|_| NetError::Timeout)?
                        .map_err(NetError::from_connection)?
                }
                other => return Err(other),
            },
        };
        let sent = timeout_at(deadline, async {
            write_frame(&mut send, msg, opts.max_frame).await?;
            send.finish()?;
            Ok::<_, NetError>(())
        })
        .await
        .unwrap_or(Err(NetError::Timeout));
        if let Err(e) = sent {
            let _ = send.reset(VarInt::from_u32(codes::STREAM_CANCELLED));
            let _ = recv.stop(VarInt::from_u32(codes::STREAM_CANCELLED));
            return Err(e);
        }
        Ok(ResponseStream {
            recv,
            max_frame: opts.max_frame,
            timeout: opts.request_timeout,
            first_deadline: Some(deadline),
            done: false,
        })
    }

    /// The cached connection to `peer` at `addr`, dialled if there is none or
    /// it was closed. Low level: most callers want [`Endpoint::request`].
    pub async fn connection(
        &self,
        addr: SocketAddr,
        peer: &VerifyingKey,
    ) -> Result<quinn::Connection, NetError> {
        let slot = self
            .inner
            .conns()
            .entry((peer.to_bytes(), addr))
            .or_default()
            .clone();
        let get = async {
            let mut cached = slot.lock().await;
            if let Some(conn) = cached.as_ref() {
                if conn.close_reason().is_none() {
                    return Ok(conn.clone());
                }
            }
            *cached = None;
            let conn = self.dial(addr, peer).await?;
            *cached = Some(conn.clone());
            Ok(conn)
        };
        let result = timeout(self.inner.opts.connect_timeout, get)
            .await
            .unwrap_or(Err(NetError::ConnectTimeout));
        if result.is_err() {
            // Do not keep slots for peers we cannot reach: the map would grow
            // with every bad address a caller tries. A dialler still holding
            // this slot simply caches into an orphan; the next caller re-dials.
            let mut conns = self.inner.conns();
            let key = (peer.to_bytes(), addr);
            if conns.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                if let Ok(cached) = slot.try_lock() {
                    if cached.is_none() {
                        conns.remove(&key);
                    }
                }
            }
        }
        result
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        peer: &VerifyingKey,
    ) -> Result<quinn::Connection, NetError> {
        let mismatch = Arc::new(AtomicBool::new(false));
        let tls = tls::client_config(self.inner.identity.clone(), peer, mismatch.clone())?;
        let crypto = QuicClientConfig::try_from(tls)
            .map_err(|e| NetError::Tls(rustls::Error::General(e.to_string())))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(self.inner.dial_transport.clone());
        let connecting = self
            .inner
            .quic
            .connect_with(config, addr, SERVER_NAME)
            .map_err(|e| match e {
                quinn::ConnectError::EndpointStopping => NetError::EndpointClosed,
                e => NetError::Connect(e),
            })?;
        match connecting.await {
            Ok(conn) if tls::peer_key(&conn).as_ref() == Some(peer) => Ok(conn),
            Ok(conn) => {
                // Unreachable with the pinning verifier; checked anyway.
                conn.close(VarInt::from_u32(codes::CLOSE_SHUTDOWN), b"wrong key");
                Err(NetError::WrongPeerKey)
            }
            Err(_) if mismatch.load(Ordering::Acquire) => Err(NetError::WrongPeerKey),
            Err(e) => Err(match NetError::from_connection(e) {
                NetError::ConnectionLost(e) => NetError::Handshake(e),
                other => other,
            }),
        }
    }

    /// Starts answering requests with `handler`; returns the accept loop's task.
    ///
    /// Each connection is authorized when accepted and again for each request;
    /// refused peers are closed with [`codes::CLOSE_UNAUTHORIZED`]. Each request
    /// runs in its own task; if the requester gives up, the handler's future is
    /// dropped. The loop ends when the endpoint is [closed](Endpoint::close). A
    /// client-only endpoint has nothing to serve and returns at once.
    pub fn serve<H: Handler>(&self, handler: H) -> JoinHandle<()> {
        let inner = self.inner.clone();
        let handler = Arc::new(handler);
        tokio::spawn(async move {
            let Some(authorizer) = inner.authorizer.clone() else {
                debug!("serve() on a client-only endpoint: nothing to accept");
                return;
            };
            while let Some(incoming) = inner.quic.accept().await {
                tokio::spawn(serve_connection(
                    incoming,
                    handler.clone(),
                    authorizer.clone(),
                    inner.opts.clone(),
                    inner.strangers.clone(),
                ));
            }
        })
    }

    /// Closes every connection and stops accepting; waits (boundedly) for
    /// peers to be told. Requests still in flight fail.
    pub async fn close(&self) {
        self.inner
            .quic
            .close(VarInt::from_u32(codes::CLOSE_SHUTDOWN), b"shutdown");
        self.inner.conns().clear();
        let _ = timeout(self.inner.opts.connect_timeout, self.inner.quic.wait_idle()).await;
    }
}

async fn serve_connection<H: Handler>(
    incoming: quinn::Incoming,
    handler: Arc<H>,
    authorizer: Arc<dyn Authorizer>,
    opts: Arc<TransportOptions>,
    strangers: Arc<Strangers>,
) {
    let remote = incoming.remote_address();
    let conn = match timeout(opts.connect_timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!(%remote, "handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%remote, "handshake timed out");
            return;
        }
    };
    let Some(peer) = tls::peer_key(&conn) else {
        // Impossible with our TLS config, which requires a raw ed25519 key.
        conn.close(VarInt::from_u32(codes::CLOSE_UNAUTHORIZED), b"no node key");
        return;
    };
    if !authorizer.is_authorized(&peer) {
        debug!(%remote, "refusing unauthorized peer");
        conn.close(VarInt::from_u32(codes::CLOSE_UNAUTHORIZED), b"unauthorized");
        return;
    }
    // A stranger holds a slot of the strangers' budget while connected; a trusted peer gets the
    // full budget (its connection started with a stranger's).
    let mut stranger = None;
    if !authorizer.is_trusted(&peer) {
        match strangers.admit(&peer, &opts.strangers) {
            Some(slot) => stranger = Some(slot),
            None => {
                debug!(%remote, "too many connections from untrusted keys: refused");
                conn.close(VarInt::from_u32(codes::CLOSE_BUSY), b"busy");
                return;
            }
        }
    } else {
        trust(&conn, &opts);
    }
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                debug!(%remote, "connection ended: {e}");
                return;
            }
        };
        if !authorizer.is_authorized(&peer) {
            debug!(%remote, "peer no longer authorized");
            conn.close(VarInt::from_u32(codes::CLOSE_UNAUTHORIZED), b"unauthorized");
            return;
        }
        if stranger.is_some() && authorizer.is_trusted(&peer) {
            stranger = None;
            trust(&conn, &opts);
        }
        let receiving = stranger.as_ref().map(|_| strangers.receiving.clone());
        tokio::spawn(serve_stream(
            handler.clone(),
            peer,
            send,
            recv,
            opts.clone(),
            receiving,
        ));
    }
}

/// Gives a trusted peer's connection the full budget: streams and flow-control window.
fn trust(conn: &quinn::Connection, opts: &TransportOptions) {
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(opts.max_concurrent_streams));
    conn.set_receive_window(varint(opts.connection_window.max(opts.stream_window())));
}

/// Serves one request. `receiving` is the strangers' pool of receiving slots for an untrusted
/// peer (`None` for a trusted one): its request is read only while holding a slot, and within the
/// strangers' deadline.
async fn serve_stream<H: Handler>(
    handler: Arc<H>,
    peer: VerifyingKey,
    mut send: SendStream,
    mut recv: RecvStream,
    opts: Arc<TransportOptions>,
    receiving: Option<Arc<tokio::sync::Semaphore>>,
) {
    let abort = |send: &mut SendStream, recv: &mut RecvStream, code: u32| {
        let _ = recv.stop(VarInt::from_u32(code));
        let _ = send.reset(VarInt::from_u32(code));
    };
    let (limit, permit) = match receiving {
        None => (opts.request_timeout, None),
        Some(pool) => {
            let deadline = Instant::now() + opts.strangers.request_timeout;
            match timeout_at(deadline, pool.acquire_owned()).await {
                Ok(Ok(permit)) => (deadline - Instant::now(), Some(permit)),
                _ => {
                    debug!("no receiving slot for an untrusted peer's request");
                    abort(&mut send, &mut recv, codes::STREAM_BUSY);
                    return;
                }
            }
        }
    };
    let timeout_code = if permit.is_some() {
        codes::STREAM_BUSY
    } else {
        codes::STREAM_CANCELLED
    };
    let request = match timeout(limit, read_frame(&mut recv, opts.max_frame)).await {
        Ok(Ok(Some(request))) => request,
        Ok(Ok(None)) => {
            // The peer opened a stream and finished it without a request.
            let _ = send.finish();
            return;
        }
        Ok(Err(e)) => {
            debug!("bad request stream: {e}");
            let code = match e {
                NetError::FrameTooLarge { .. } => codes::STREAM_FRAME_TOO_LARGE,
                _ => codes::STREAM_BAD_REQUEST,
            };
            abort(&mut send, &mut recv, code);
            return;
        }
        Err(_) => {
            debug!("request not received in time");
            abort(&mut send, &mut recv, timeout_code);
            return;
        }
    };
    drop(permit);
    drop(recv);
    let requester_gone = send.stopped();
    let mut out = Responder {
        send,
        max_frame: opts.max_frame,
    };
    tokio::select! {
        answered = handler.handle_stream(peer, request, &mut out) => match answered {
            Ok(()) => {
                let _ = out.send.finish();
            }
            Err(e) => {
                debug!("response failed: {e}");
                let _ = out.send.reset(VarInt::from_u32(codes::STREAM_HANDLER_FAILED));
            }
        },
        _ = requester_gone => {
            debug!("requester cancelled; dropping the handler");
        }
    }
}
