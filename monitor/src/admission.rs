//! Who may connect, and how many at once: the agent port is reachable by anything on the VM's
//! network, so every connection holds a slot from a fixed budget (in total, per peer address,
//! and while a websocket has not finished the protocol handshake), and only addresses on the
//! `--agent-allow` list may open the agent websocket. Everything here is bounded: a flood costs
//! at most [`Limits::max_connections`] sockets, each for at most [`Limits::http_deadline`]
//! before it is upgraded.

use ipnet::IpNet;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Connection budgets and deadlines of the agent listener.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open TCP connections in any state (well below the default 1024 descriptors).
    pub max_connections: usize,
    /// Open TCP connections from one IP address.
    pub max_per_peer: usize,
    /// Open TCP connections from addresses outside `--agent-allow` (they only ever get a 403
    /// or `/healthz`): however many addresses they come from, they cannot fill the budget
    /// the agent needs.
    pub max_outsiders: usize,
    /// Websockets upgraded but not yet through the version handshake.
    pub max_handshaking: usize,
    /// Time for a client to send its request headers (the agent's whole dial + upgrade +
    /// handshake budget is 4 s).
    pub header_timeout: Duration,
    /// A connection still speaking plain HTTP after this long is dropped, whatever it does.
    pub http_deadline: Duration,
    /// TCP_NODELAY on accepted sockets (off only to measure what it saves).
    pub tcp_nodelay: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 128,
            max_per_peer: 16,
            max_outsiders: 16,
            max_handshaking: 16,
            header_timeout: Duration::from_secs(4),
            http_deadline: Duration::from_secs(10),
            tcp_nodelay: true,
        }
    }
}

/// Addresses allowed to open the agent websocket (`--agent-allow`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentAllow(Vec<IpNet>);

/// Loopback, the RFC 1918 and shared (CGNAT) IPv4 ranges, link-local, and IPv6 ULA: where a
/// pod or node network lives. The agent connects from inside the cluster, never from the
/// internet, so this keeps the drop-in working without an extra flag.
const PRIVATE: [&str; 9] = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
];

impl AgentAllow {
    /// Every address.
    pub fn any() -> Self {
        Self(vec![
            IpNet::V4(ipnet::Ipv4Net::default()),
            IpNet::V6(ipnet::Ipv6Net::default()),
        ])
    }

    /// The default: loopback and private networks ([`PRIVATE`]).
    pub fn private() -> Self {
        Self(
            PRIVATE
                .iter()
                .filter_map(|n| IpNet::from_str(n).ok())
                .collect(),
        )
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        // A v4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

impl Default for AgentAllow {
    fn default() -> Self {
        Self::private()
    }
}

impl fmt::Display for AgentAllow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for AgentAllow {
    type Err = String;

    /// A comma-separated list of CIDRs or single addresses, or the words `private` (the
    /// default ranges) and `any`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for item in s.split(',').map(str::trim) {
            match item {
                "" => return Err("empty entry in the address list".to_string()),
                "any" => nets.extend(Self::any().0),
                "private" => nets.extend(Self::private().0),
                _ => {
                    let net = IpNet::from_str(item)
                        .or_else(|_| IpAddr::from_str(item).map(IpNet::from))
                        .map_err(|_| {
                            format!("{item:?} is not an IP address or CIDR (e.g. 10.0.0.0/8)")
                        })?;
                    nets.push(net.trunc());
                }
            }
        }
        Ok(Self(nets))
    }
}

/// Why a connection or upgrade was turned away (a label of `connections_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// [`Limits::max_connections`] reached.
    TooManyConnections,
    /// [`Limits::max_per_peer`] reached for this address.
    TooManyFromPeer,
    /// [`Limits::max_outsiders`] reached, for an address outside the allow-list.
    TooManyOutsiders,
    /// [`Limits::max_handshaking`] reached.
    TooManyHandshaking,
    /// Not on `--agent-allow`.
    NotAllowed,
    /// The upgrade request carried an `Origin` header (a browser page).
    Origin,
    /// A healthy agent session is current; see `Sessions::claim`.
    SeatTaken,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::TooManyConnections,
        Refusal::TooManyFromPeer,
        Refusal::TooManyOutsiders,
        Refusal::TooManyHandshaking,
        Refusal::NotAllowed,
        Refusal::Origin,
        Refusal::SeatTaken,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::TooManyFromPeer => "too_many_from_peer",
            Refusal::TooManyOutsiders => "too_many_outside_allow_list",
            Refusal::TooManyHandshaking => "too_many_handshaking",
            Refusal::NotAllowed => "not_allowed",
            Refusal::Origin => "origin",
            Refusal::SeatTaken => "agent_session_active",
        }
    }
}

/// The listener's budgets in use, and what was refused.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    allow: AgentAllow,
    open: Mutex<Open>,
    refused: [AtomicU64; Refusal::ALL.len()],
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    outsiders: usize,
    handshaking: usize,
    per_peer: HashMap<IpAddr, usize>,
}

impl Admission {
    pub fn new(limits: Limits, allow: AgentAllow) -> Arc<Self> {
        Arc::new(Self {
            limits,
            allow,
            open: Mutex::new(Open::default()),
            refused: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn allow(&self) -> &AgentAllow {
        &self.allow
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // Plain counters: still coherent after a panic elsewhere.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a refusal (for `/metrics`).
    pub fn refused(&self, why: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|r| *r == why) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refusals so far, by reason.
    pub fn refusals(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL
            .iter()
            .zip(&self.refused)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
    }

    /// Open connections (any state) and websockets still handshaking.
    pub fn open(&self) -> (usize, usize) {
        let open = self.lock();
        (open.total, open.handshaking)
    }

    /// A slot for a new TCP connection from `peer`, or why not.
    pub fn connect(self: &Arc<Self>, peer: SocketAddr) -> Result<ConnSlot, Refusal> {
        let ip = peer.ip().to_canonical();
        let outsider = !self.allow.allows(ip);
        let mut open = self.lock();
        let why = if open.total >= self.limits.max_connections {
            Some(Refusal::TooManyConnections)
        } else if outsider && open.outsiders >= self.limits.max_outsiders {
            Some(Refusal::TooManyOutsiders)
        } else if open.per_peer.get(&ip).copied().unwrap_or(0) >= self.limits.max_per_peer {
            Some(Refusal::TooManyFromPeer)
        } else {
            None
        };
        if let Some(why) = why {
            drop(open);
            self.refused(why);
            return Err(why);
        }
        open.total += 1;
        open.outsiders += usize::from(outsider);
        *open.per_peer.entry(ip).or_default() += 1;
        Ok(ConnSlot {
            admission: Arc::clone(self),
            ip,
            outsider,
        })
    }

    /// A slot for a websocket that has yet to complete the handshake (the caller answers and
    /// counts a refusal).
    pub fn handshake(self: &Arc<Self>) -> Result<HandshakeSlot, Refusal> {
        let mut open = self.lock();
        if open.handshaking >= self.limits.max_handshaking {
            return Err(Refusal::TooManyHandshaking);
        }
        open.handshaking += 1;
        Ok(HandshakeSlot {
            admission: Arc::clone(self),
        })
    }
}

/// One open TCP connection's share of the budget; released on drop (when the socket closes,
/// also after an upgrade: the slot travels inside the socket, see [`Counted`]).
#[derive(Debug)]
pub struct ConnSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
    outsider: bool,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total = open.total.saturating_sub(1);
        open.outsiders = open.outsiders.saturating_sub(usize::from(self.outsider));
        if let Some(n) = open.per_peer.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_peer.remove(&self.ip);
            }
        }
    }
}

/// A websocket's handshake-phase slot; dropped when the handshake ends either way.
#[derive(Debug)]
pub struct HandshakeSlot {
    admission: Arc<Admission>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.handshaking = open.handshaking.saturating_sub(1);
    }
}

/// A socket that holds its [`ConnSlot`] for as long as it lives.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    _slot: ConnSlot,
}

impl<S> Counted<S> {
    pub fn new(inner: S, slot: ConnSlot) -> Self {
        Self { inner, _slot: slot }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_allows_loopback_and_private_networks_only() {
        let allow = AgentAllow::default();
        for ok in [
            "127.0.0.1",
            "10.2.3.4",
            "172.31.0.9",
            "192.168.1.1",
            "::1",
            "fd00::1",
        ] {
            assert!(allow.allows(ip(ok)), "{ok}");
        }
        for no in ["8.8.8.8", "172.32.0.1", "2001:db8::1", "1.1.1.1"] {
            assert!(!allow.allows(ip(no)), "{no}");
        }
        // A v4 peer seen through a dual-stack listener.
        assert!(allow.allows(ip("::ffff:10.0.0.1")));
        assert!(!allow.allows(ip("::ffff:8.8.8.8")));
    }

    #[test]
    fn parses_cidrs_addresses_and_keywords() {
        let allow: AgentAllow = "10.1.0.0/16, 192.0.2.7,2001:db8::/32".parse().unwrap();
        assert!(allow.allows(ip("10.1.200.3")));
        assert!(!allow.allows(ip("10.2.0.1")));
        assert!(allow.allows(ip("192.0.2.7")));
        assert!(!allow.allows(ip("192.0.2.8")));
        assert!(allow.allows(ip("2001:db8:1::5")));
        assert!(!allow.allows(ip("127.0.0.1")));
        let any: AgentAllow = "any".parse().unwrap();
        assert!(any.allows(ip("8.8.8.8")) && any.allows(ip("2001:db8::1")));
        // Host bits are ignored rather than refused.
        let t: AgentAllow = "10.1.2.3/8".parse().unwrap();
        assert_eq!(t.to_string(), "10.0.0.0/8");
    }

    #[test]
    fn bad_lists_are_refused_with_the_entry() {
        for bad in ["", "10.0.0.0/33", "nope", "10.0.0.1,", "1.2.3"] {
            let err = bad.parse::<AgentAllow>().unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!(
            "nope"
                .parse::<AgentAllow>()
                .unwrap_err()
                .contains("\"nope\""),
            "names the entry"
        );
    }

    #[test]
    fn connection_budget_counts_total_and_per_peer_and_releases_on_drop() {
        let limits = Limits {
            max_connections: 3,
            max_per_peer: 2,
            ..Limits::default()
        };
        let a = Admission::new(limits, AgentAllow::default());
        let p1: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let p2: SocketAddr = "10.0.0.2:1000".parse().unwrap();
        let s1 = a.connect(p1).unwrap();
        let s2 = a.connect(p1).unwrap();
        assert_eq!(a.connect(p1).unwrap_err(), Refusal::TooManyFromPeer);
        let s3 = a.connect(p2).unwrap();
        assert_eq!(a.connect(p2).unwrap_err(), Refusal::TooManyConnections);
        assert_eq!(a.open().0, 3);
        drop(s1);
        let _s4 = a.connect(p1).unwrap();
        drop((s2, s3));
        assert_eq!(a.open().0, 1);
        let refused: HashMap<_, _> = a.refusals().collect();
        assert_eq!(refused[&Refusal::TooManyFromPeer], 1);
        assert_eq!(refused[&Refusal::TooManyConnections], 1);
    }

    #[test]
    fn outsiders_share_a_small_budget_of_their_own() {
        let limits = Limits {
            max_outsiders: 2,
            ..Limits::default()
        };
        let a = Admission::new(limits, "10.0.0.0/8".parse().unwrap());
        let out = |n: u8| SocketAddr::from(([192, 0, 2, n], 1000));
        let _o1 = a.connect(out(1)).unwrap();
        let o2 = a.connect(out(2)).unwrap();
        assert_eq!(a.connect(out(3)).unwrap_err(), Refusal::TooManyOutsiders);
        // Insiders are unaffected.
        let _i = a.connect("10.0.0.1:1".parse().unwrap()).unwrap();
        drop(o2);
        assert!(a.connect(out(3)).is_ok());
    }

    #[test]
    fn handshake_budget_is_bounded_and_released() {
        let limits = Limits {
            max_handshaking: 1,
            ..Limits::default()
        };
        let a = Admission::new(limits, AgentAllow::default());
        let h = a.handshake().unwrap();
        assert_eq!(a.handshake().unwrap_err(), Refusal::TooManyHandshaking);
        drop(h);
        assert!(a.handshake().is_ok());
    }
}
