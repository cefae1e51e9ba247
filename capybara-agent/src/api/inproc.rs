//! The in-process connection: how a scheduled task's command reaches the agent's own API
//! without a socket. Each connection is a `tokio::io::duplex` pipe; the agent's end is handed
//! to the API server (`server::run` serves [`Incoming`] like a listener, with the same router:
//! every service, the same handlers, scope checks, validation and audit), the other end is the
//! CLI's gRPC channel ([`Client::in_process`]).
//!
//! A connection carries the id of the task it runs for ([`ScheduleCaller`], its connect info,
//! which tonic puts into every request's extensions); `handler::authorize` makes it the actor
//! `schedule:<id>` with the admin scope (only an admin may add a task). Nothing outside the
//! agent's process can open such a connection: there is no address, only the [`Connector`] the
//! agent hands to its scheduler.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf},
    sync::mpsc,
};
use tonic::transport::server::Connected;

use super::client::{Client, ClientError};

/// Bytes buffered each way in a connection's pipe.
const PIPE_BYTES: usize = 256 * 1024;
/// Connections waiting for the server to accept them.
const BACKLOG: usize = 16;

/// Who is on an in-process connection: the scheduled task it runs for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleCaller {
    /// The task's id.
    pub task: u64,
}

/// The agent's end of an in-process connection.
#[derive(Debug)]
pub struct ServerConn {
    io: DuplexStream,
    caller: ScheduleCaller,
}

impl Connected for ServerConn {
    type ConnectInfo = ScheduleCaller;

    fn connect_info(&self) -> ScheduleCaller {
        self.caller
    }
}

impl AsyncRead for ServerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The connections the API server accepts (a field of `server::Listeners`).
#[derive(Debug)]
pub struct Incoming(mpsc::Receiver<ServerConn>);

impl Incoming {
    /// As the stream `serve_with_incoming` takes.
    pub(super) fn into_stream(
        self,
    ) -> impl tokio_stream::Stream<Item = Result<ServerConn, std::io::Error>> {
        tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(self.0), Ok)
    }
}

/// Opens in-process connections to the API for scheduled tasks.
#[derive(Clone, Debug)]
pub struct Connector(mpsc::Sender<ServerConn>);

/// A connector and the server side it connects to.
pub fn channel() -> (Connector, Incoming) {
    let (tx, rx) = mpsc::channel(BACKLOG);
    (Connector(tx), Incoming(rx))
}

impl Client {
    /// A client on an in-process connection of `connector`, acting for task `task`.
    pub async fn in_process(connector: &Connector, task: u64) -> Result<Client, ClientError> {
        let tx = connector.0.clone();
        let channel = tonic::transport::Endpoint::from_static("http://in-process.capybara")
            .connect_with_connector(tower::service_fn(move |_| {
                let tx = tx.clone();
                async move {
                    let (client, server) = tokio::io::duplex(PIPE_BYTES);
                    tx.send(ServerConn {
                        io: server,
                        caller: ScheduleCaller { task },
                    })
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            "the agent's API is not serving",
                        )
                    })?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
                }
            }))
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: "the agent's own API (in-process)".into(),
                source,
            })?;
        Ok(Client::from_channel(channel))
    }
}
