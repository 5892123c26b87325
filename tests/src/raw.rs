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
