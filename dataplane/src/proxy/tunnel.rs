//! HBONE streams: one HTTP/2 CONNECT stream of a mutual-TLS connection,
//! carrying one proxied TCP connection, on the `h2` crate directly.
//!
//! Directly, rather than through hyper's upgrade machinery, so a chunk read
//! from a socket is handed to h2 by ownership and framed without a copy, a
//! received DATA frame is written to the socket as h2 decoded it, and an
//! idle stream holds no buffer (see [`super::relay`]). Both ends of HBONE
//! (the client pool and the inbound server) use the settings here.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// HTTP/2 flow-control windows: large enough that one stream can fill a
/// fast link without waiting for WINDOW_UPDATEs (the defaults of 64 KiB cap
/// a stream at a few hundred Mbit/s on a millisecond of latency). A window
/// is a limit, not an allocation: an idle stream holds nothing.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// The largest DATA frame we accept: a relay chunk fits in one frame.
pub const MAX_FRAME_SIZE: u32 = super::relay::MAX_CHUNK as u32;
/// HTTP/2 PINGs keep idle pooled connections alive through NATs and detect
/// dead peers.
pub const KEEPALIVE: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/2 settings of an HBONE client connection.
pub fn client() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE);
    builder
}

/// The HTTP/2 settings of an HBONE server connection.
pub fn server() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE);
    builder
}

/// One CONNECT stream, either end.
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What a reader through [`AsyncRead`] has not taken yet.
    unread: Bytes,
    /// Bytes taken from `recv` but not yet released to the peer's window.
    unreleased: usize,
}

fn h2_error(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    let kind = match error.reason() {
        // The peer reset the stream: its end of the connection is gone.
        Some(_) if error.is_remote() => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::BrokenPipe,
    };
    io::Error::new(kind, error)
}

impl HboneStream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            unreleased: 0,
        }
    }

    /// The next DATA payload from the peer, `None` at end of stream. Its
    /// window is released by [`HboneStream::release`].
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        match ready!(self.recv.poll_data(cx)) {
            Some(Ok(data)) => Poll::Ready(Ok(Some(data))),
            Some(Err(e)) => Poll::Ready(Err(h2_error(e))),
            None => Poll::Ready(Ok(None)),
        }
    }

    /// Gives `n` received bytes back to the peer's send window.
    pub fn release(&mut self, n: usize) {
        // Fails only once the stream is gone, which the next read reports.
        let _ = self.recv.flow_control().release_capacity(n);
    }

    /// How much may be sent now (at least 1), asking h2 for room for
    /// `wanted` bytes when there is none.
    fn poll_room(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<io::Result<usize>> {
        loop {
            let available = self.send.capacity();
            if available > 0 {
                return Poll::Ready(Ok(available));
            }
            self.send.reserve_capacity(wanted);
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(n)) if n > 0 => return Poll::Ready(Ok(n)),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    /// Sends `chunk` as DATA frames, by ownership, as the peer's window
    /// allows; ready once all of it is with h2.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        while !chunk.is_empty() {
            let room = ready!(self.poll_room(cx, chunk.len()))?;
            let part = chunk.split_to(room.min(chunk.len()));
            self.send.send_data(part, false).map_err(h2_error)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Ends the stream our way (END_STREAM): the far side reads EOF.
    pub fn finish(&mut self) -> io::Result<()> {
        self.send.send_data(Bytes::new(), true).map_err(h2_error)
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.unread.is_empty() {
            let unreleased = std::mem::take(&mut self.unreleased);
            self.release(unreleased);
            match ready!(self.poll_chunk(cx))? {
                Some(data) => {
                    self.unreleased = data.len();
                    self.unread = data;
                }
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_room(cx, data.len()))?.min(data.len());
        self.send
            .send_data(Bytes::copy_from_slice(&data[..n]), false)
            .map_err(h2_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish())
    }
}

/// Resolves when the peer stopped answering PINGs (or the connection
/// ended): the connection's owner then drops it.
pub async fn keepalive(mut ping_pong: Option<h2::PingPong>) {
    let Some(ping_pong) = ping_pong.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// How much [`ReadAhead`] asks the kernel for at once.
const READ_AHEAD: usize = 64 * 1024;

/// Reads ahead under TLS. rustls asks its transport for at most 4 KiB at a
/// time, so a bulk transfer would cost a system call per 4 KiB; this asks
/// for up to [`READ_AHEAD`] and serves the small reads from memory. The
/// buffer exists only while it holds unread bytes: an idle pooled
/// connection keeps none.
pub struct ReadAhead<T> {
    inner: T,
    ahead: BytesMut,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            ahead: BytesMut::new(),
        }
    }

    /// Bytes read from the transport and not yet taken (for tests).
    #[cfg(test)]
    fn buffered(&self) -> (usize, usize) {
        (self.ahead.len(), self.ahead.capacity())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.ahead.is_empty() {
            if buf.remaining() >= READ_AHEAD {
                return Pin::new(&mut self.inner).poll_read(cx, buf);
            }
            let mut ahead = BytesMut::with_capacity(READ_AHEAD);
            if ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.inner),
                cx,
                &mut ahead
            ))? == 0
            {
                return Poll::Ready(Ok(()));
            }
            self.ahead = ahead;
        }
        let n = self.ahead.len().min(buf.remaining());
        buf.put_slice(&self.ahead[..n]);
        self.ahead.advance(n);
        if self.ahead.is_empty() {
            // Drained: give the memory back rather than keep it per
            // connection.
            self.ahead = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small reads, as rustls makes them, get every byte in order; the
    /// buffer is gone once drained and at end of stream.
    #[tokio::test]
    async fn read_ahead_serves_small_reads_and_keeps_nothing_when_drained() {
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..300_000).map(|i| (i % 249) as u8).collect();
        writer.write_all(&data).await.unwrap();
        drop(writer);
        let mut reader = ReadAhead::new(reader);
        let mut got = vec![];
        let mut small = [0u8; 4096];
        let mut saw_buffered = false;
        loop {
            let n = reader.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
            let (len, cap) = reader.buffered();
            saw_buffered |= len > 0;
            if len == 0 {
                assert_eq!(cap, 0, "a drained read-ahead buffer is freed");
            }
        }
        assert!(saw_buffered, "small reads were served from a read-ahead");
        assert!(got == data, "read-ahead changed the bytes");
        assert_eq!(reader.buffered(), (0, 0));
        // A large read goes straight through.
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        writer.write_all(&data[..100_000]).await.unwrap();
        let mut reader = ReadAhead::new(reader);
        let mut big = vec![0u8; READ_AHEAD];
        let n = reader.read(&mut big).await.unwrap();
        assert!(n > 0 && big[..n] == data[..n]);
        assert_eq!(reader.buffered(), (0, 0));
    }
}
