//! The host's end of the guest agent channel.

use strata_proto::{GuestMsg, HostMsg};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::Error;

/// A connected agent channel.
pub struct AgentConn {
    pub reader: AgentReader,
    pub writer: AgentWriter,
}

/// Receiving half of the channel.
pub struct AgentReader {
    rd: BufReader<OwnedReadHalf>,
}

/// Sending half of the channel.
pub struct AgentWriter {
    wr: OwnedWriteHalf,
}

impl AgentConn {
    pub(crate) fn new(stream: UnixStream) -> AgentConn {
        let (rd, wr) = stream.into_split();
        AgentConn { reader: AgentReader { rd: BufReader::with_capacity(64 << 10, rd) }, writer: AgentWriter { wr } }
    }

    /// Sends one message.
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn send(&mut self, msg: &HostMsg) -> Result<(), Error> {
        self.writer.send(msg).await
    }

    /// Receives one message; `None` when the guest side is gone.
    ///
    /// # Errors
    /// On a broken channel or a malformed message.
    pub async fn recv(&mut self) -> Result<Option<GuestMsg>, Error> {
        self.reader.recv().await
    }
}

impl AgentWriter {
    /// Sends one message.
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn send(&mut self, msg: &HostMsg) -> Result<(), Error> {
        tracing::trace!(?msg, "to agent");
        let frame = strata_proto::encode(msg)?;
        self.wr.write_all(&frame).await.map_err(Error::Channel)
    }
}

impl AgentReader {
    /// Receives one message; `None` when the guest side is gone.
    ///
    /// # Errors
    /// On a broken channel or a malformed message.
    pub async fn recv(&mut self) -> Result<Option<GuestMsg>, Error> {
        let mut prefix = [0u8; 4];
        match self.rd.read_exact(&mut prefix).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(Error::Channel(e)),
        }
        let mut payload = vec![0u8; strata_proto::frame_len(prefix)?];
        self.rd.read_exact(&mut payload).await.map_err(Error::Channel)?;
        let msg = strata_proto::decode(&payload)?;
        tracing::trace!(?msg, "from agent");
        Ok(Some(msg))
    }
}
