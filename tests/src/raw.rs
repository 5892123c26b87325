//! A bare websocket client for probing the monitor with frames no agent would send.

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The agent's reply timeout; used as the bound for "the monitor answers".
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP connection to `url`'s host:port from the local address `from`.
pub async fn connect_tcp_from(url: &str, from: std::net::IpAddr) -> anyhow::Result<TcpStream> {
    let hostport = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("not a ws:// URL: {url}"))?;
    let addr: std::net::SocketAddr = hostport
        .parse()
        .with_context(|| format!("not IP:PORT in {url}"))?;
    let socket = match from {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket
        .bind((from, 0).into())
        .with_context(|| format!("binding {from}"))?;
    socket
        .connect(addr)
        .await
        .with_context(|| format!("connecting to {addr} from {from}"))
}

pub struct RawClient {
    pub ws: Ws,
}

impl RawClient {
    /// Upgrades only; sends nothing.
    pub async fn connect(url: &str) -> anyhow::Result<RawClient> {
        let (ws, _) = tokio::time::timeout(AGENT_TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .context("websocket upgrade timed out")?
            .with_context(|| format!("connecting to {url}"))?;
        Ok(RawClient { ws })
    }

    /// Upgrades from the local address `from` (e.g. 127.0.0.2: another peer on loopback);
    /// sends nothing.
    pub async fn connect_from(url: &str, from: std::net::IpAddr) -> anyhow::Result<RawClient> {
        let fut = async {
            let tcp = connect_tcp_from(url, from).await?;
            let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp))
                .await
                .with_context(|| format!("upgrading {url} from {from}"))?;
            anyhow::Ok(RawClient { ws })
        };
        tokio::time::timeout(AGENT_TIMEOUT, fut)
            .await
            .context("websocket upgrade timed out")?
    }

    /// Upgrades and completes the v1.0 handshake (asserting the reply is `{"version":1}`).
    pub async fn handshake(url: &str) -> anyhow::Result<RawClient> {
        let mut c = Self::connect(url).await?;
        c.send_text(r#"{"min":1,"max":1}"#).await?;
        let reply = c.recv_text(AGENT_TIMEOUT).await?;
        if reply != r#"{"version":1}"# {
            bail!("unexpected handshake reply {reply}");
        }
        Ok(c)
    }

    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .context("sending text frame")
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) -> anyhow::Result<()> {
        self.ws
            .send(Message::binary(data))
            .await
            .context("sending binary frame")
    }

    /// Next data or close frame (pings/pongs skipped); `None` when the stream ended.
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<Option<Message>> {
        let fut = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(m)) => return Ok(Some(m)),
                    Some(Err(e)) => return Err(anyhow::Error::new(e).context("reading frame")),
                    None => return Ok(None),
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .with_context(|| format!("no frame within {timeout:?}"))?
    }

    pub async fn recv_text(&mut self, timeout: Duration) -> anyhow::Result<String> {
        match self.recv(timeout).await? {
            Some(Message::Text(t)) => Ok(t.to_string()),
            other => bail!("expected a text frame, got {other:?}"),
        }
    }

    /// Reads until a close frame and returns `(code, reason)`; fails on data frames or EOF.
    pub async fn expect_close(&mut self, timeout: Duration) -> anyhow::Result<(u16, String)> {
        match self.recv(timeout).await? {
            Some(Message::Close(Some(f))) => Ok((u16::from(f.code), f.reason.to_string())),
            Some(Message::Close(None)) => bail!("close frame without a code"),
            other => bail!("expected a close frame, got {other:?}"),
        }
    }

    /// Sends a health check with `id` and asserts the echo comes back as the next frame.
    pub async fn health_check(&mut self, id: u64) -> anyhow::Result<()> {
        self.send_text(&format!(
            r#"{{"content":{{}},"type":"HealthCheck","id":{id}}}"#
        ))
        .await?;
        let reply = self.recv_text(AGENT_TIMEOUT).await?;
        let want = format!(r#"{{"type":"HealthCheck","id":{id}}}"#);
        if reply != want {
            bail!("expected {want}, got {reply}");
        }
        Ok(())
    }
}
