//! Moving a connection's bytes between its two sides, holding no memory
//! while they are idle.
//!
//! A node proxy holds every connection of every pod on its node, and most of
//! them are idle most of the time (keep-alive HTTP, database pools), so a
//! relay owns no copy buffer. A TCP side is read only once the kernel says it
//! is readable, into a chunk allocated for that read and passed on by
//! ownership: to h2, which frames it without copying, or to a socket, after
//! which it is freed. An HBONE side hands over the `Bytes` h2 decoded, and
//! its flow-control window is released only once they were written on, so a
//! slow reader slows the sender instead of growing our memory. An idle relay
//! is a few words of state.
//!
//! Chunks start small and grow while reads keep filling them (bulk
//! transfers then move up to [`MAX_CHUNK`] per system call and per h2
//! frame), and shrink again when they do not.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::tunnel::HboneStream;

/// The first read of a burst: one TLS record's worth, enough for most
/// requests and responses.
pub const MIN_CHUNK: usize = 16 * 1024;
/// The largest read: bigger chunks gained nothing measurable in bulk
/// transfers and only hold more memory per busy connection.
pub const MAX_CHUNK: usize = 256 * 1024;

/// What a finished relay moved.
#[derive(Debug, Default)]
pub struct Relayed {
    /// Bytes from the first side to the second.
    pub forward: u64,
    /// Bytes from the second side to the first.
    pub backward: u64,
    /// The error that ended it, if any.
    pub error: Option<io::Error>,
}

/// One side of a relay: a source of chunks and a sink for the other side's.
pub trait Side {
    /// The next chunk read, `None` at end of stream.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>>;
    /// `n` bytes of a chunk from [`Side::poll_chunk`] were delivered on: the
    /// sender may send that much more.
    fn delivered(&mut self, _n: usize) {}
    /// Sends the front of `chunk` on, advancing it; ready once it is empty.
    fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>>;
    /// No more data will be sent this way (a half-close).
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// Relays between `a` and `b` until both directions reached end of stream,
/// passing half-closes on, or until the first error.
pub async fn relay<A: Side, B: Side>(a: &mut A, b: &mut B) -> Relayed {
    let mut forward = Direction::default();
    let mut backward = Direction::default();
    let result = poll_fn(|cx| {
        let f = forward.poll(cx, a, b)?;
        let r = backward.poll(cx, b, a)?;
        if f.is_ready() && r.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    Relayed {
        forward: forward.bytes,
        backward: backward.bytes,
        error: result.err(),
    }
}

/// The state of one direction: at most one chunk in flight.
#[derive(Default)]
struct Direction {
    pending: Option<Bytes>,
    pending_len: usize,
    eof: bool,
    done: bool,
    bytes: u64,
}

impl Direction {
    fn poll<S: Side, D: Side>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut S,
        to: &mut D,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(chunk) = &mut self.pending {
                ready!(to.poll_send(cx, chunk))?;
                self.pending = None;
                from.delivered(self.pending_len);
            }
            if self.eof {
                ready!(to.poll_finish(cx))?;
                self.done = true;
                continue;
            }
            match ready!(from.poll_chunk(cx))? {
                Some(chunk) => {
                    self.bytes += chunk.len() as u64;
                    self.pending_len = chunk.len();
                    self.pending = Some(chunk);
                }
                None => self.eof = true,
            }
        }
    }
}

/// A TCP connection as a relay side.
pub struct TcpSide<'a> {
    stream: &'a mut TcpStream,
    next_chunk: usize,
    /// The last chunk read, kept while data flows so its allocation can be
    /// reused once the other side is done with it (no allocation and no
    /// fresh pages per chunk in a bulk transfer); dropped as soon as the
    /// socket has nothing more to read, so an idle side holds nothing.
    last: Option<Bytes>,
}

impl<'a> TcpSide<'a> {
    pub fn new(stream: &'a mut TcpStream) -> Self {
        Self {
            stream,
            next_chunk: MIN_CHUNK,
            last: None,
        }
    }

    /// A buffer for the next read: the last chunk's, when nothing else
    /// holds it any more and it is big enough, else a new one.
    fn next_buffer(&mut self) -> BytesMut {
        if let Some(Ok(mut reused)) = self.last.take().map(Bytes::try_into_mut)
            && reused.capacity() >= self.next_chunk
        {
            reused.clear();
            return reused;
        }
        BytesMut::with_capacity(self.next_chunk)
    }
}

/// The size of the read after one that filled `read` bytes of `size`.
pub fn next_chunk_size(size: usize, read: usize) -> usize {
    if read == size {
        (size * 2).min(MAX_CHUNK)
    } else if read < size / 4 {
        (size / 2).max(MIN_CHUNK)
    } else {
        size
    }
}

impl Side for TcpSide<'_> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            // Allocate only once there is something to read.
            if self.stream.poll_read_ready(cx)?.is_pending() {
                self.last = None;
                return Poll::Pending;
            }
            let mut chunk = self.next_buffer();
            match self.stream.try_read_buf(&mut chunk) {
                Ok(0) => {
                    self.last = None;
                    return Poll::Ready(Ok(None));
                }
                Ok(n) => {
                    self.next_chunk = next_chunk_size(self.next_chunk, n);
                    let chunk = chunk.freeze();
                    self.last = Some(chunk.clone());
                    return Poll::Ready(Ok(Some(chunk)));
                }
                // The readiness was stale; `try_read_buf` cleared it.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        while !chunk.is_empty() {
            let n = ready!(Pin::new(&mut *self.stream).poll_write(cx, chunk))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            chunk.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut *self.stream).poll_shutdown(cx)) {
            // The peer is already gone: nothing left to tell it.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

impl Side for HboneStream {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        HboneStream::poll_chunk(self, cx)
    }

    fn delivered(&mut self, n: usize) {
        self.release(n);
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        HboneStream::poll_send(self, cx, chunk)
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish())
    }
}

/// Relays between a TCP connection and an HBONE stream.
pub async fn tcp_to_hbone(tcp: &mut TcpStream, hbone: &mut HboneStream) -> Relayed {
    relay(&mut TcpSide::new(tcp), hbone).await
}

/// Relays between two TCP connections.
pub async fn tcp_to_tcp(a: &mut TcpStream, b: &mut TcpStream) -> Relayed {
    relay(&mut TcpSide::new(a), &mut TcpSide::new(b)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn chunks_grow_while_reads_fill_them_and_shrink_when_they_do_not() {
        let mut size = MIN_CHUNK;
        for _ in 0..10 {
            size = next_chunk_size(size, size);
        }
        assert_eq!(size, MAX_CHUNK);
        // A half-full read keeps the size.
        assert_eq!(next_chunk_size(size, size / 2), size);
        for _ in 0..10 {
            size = next_chunk_size(size, 100);
        }
        assert_eq!(size, MIN_CHUNK);
    }

    /// A connected pair of TCP streams on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// client ⇄ [a relay b] ⇄ server, with 8 MiB one way and 3 MiB the
    /// other (so chunks grow and both directions are busy at once), then a
    /// half-close each way in turn.
    #[tokio::test]
    async fn tcp_relay_moves_large_transfers_both_ways_and_passes_half_closes_on() {
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let relay = tokio::spawn(async move { tcp_to_tcp(&mut a, &mut b).await });

        let up: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..3 << 20).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let server_task = tokio::spawn(async move {
            let (mut r, mut w) = server.split();
            let read = async {
                let mut got = vec![];
                r.read_to_end(&mut got).await.unwrap();
                got
            };
            let write = async {
                w.write_all(&down2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let (got, ()) = tokio::join!(read, write);
            assert!(got == up2, "server received other bytes than sent");
        });
        let (mut r, mut w) = client.split();
        let write = async {
            w.write_all(&up).await.unwrap();
            // Half-close: the server must see EOF while still sending.
            w.shutdown().await.unwrap();
        };
        let read = async {
            let mut got = vec![];
            r.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(write, read);
        assert!(got == down, "client received other bytes than sent");
        server_task.await.unwrap();
        let relayed = relay.await.unwrap();
        assert_eq!(relayed.forward, up.len() as u64);
        assert_eq!(relayed.backward, down.len() as u64);
        assert!(relayed.error.is_none(), "{:?}", relayed.error);
    }

    /// While data flows a side reuses the buffer of a chunk the other side
    /// is done with (not one still held); once the socket has nothing to
    /// read it keeps no buffer at all.
    #[tokio::test]
    async fn a_side_reuses_a_released_chunk_and_keeps_nothing_when_idle() {
        let (mut client, mut server) = pair().await;
        let mut side = TcpSide::new(&mut server);
        /// The chunk a single poll gives, `None` for Pending.
        async fn next(side: &mut TcpSide<'_>) -> Option<Bytes> {
            poll_fn(|cx| match side.poll_chunk(cx) {
                Poll::Pending => Poll::Ready(None),
                Poll::Ready(chunk) => Poll::Ready(Some(chunk.unwrap().unwrap())),
            })
            .await
        }
        async fn wait_readable(side: &TcpSide<'_>) {
            side.stream.readable().await.unwrap();
        }

        client.write_all(&[1u8; 1000]).await.unwrap();
        wait_readable(&side).await;
        let first = next(&mut side).await.expect("data to read");
        let first_ptr = first.as_ptr();
        // Still held by "the other side": the next read needs a new buffer.
        client.write_all(&[2u8; 1000]).await.unwrap();
        wait_readable(&side).await;
        let second = next(&mut side).await.expect("data to read");
        assert_ne!(second.as_ptr(), first_ptr);
        assert!(second.iter().all(|b| *b == 2));
        drop(first);
        // Released: the next read reuses it.
        drop(second);
        client.write_all(&[3u8; 1000]).await.unwrap();
        wait_readable(&side).await;
        let second_ptr = {
            let third = next(&mut side).await.expect("data to read");
            assert!(
                third.iter().all(|b| *b == 3),
                "a reused buffer holds only new bytes"
            );
            third.as_ptr()
        };
        client.write_all(&[4u8; 10]).await.unwrap();
        wait_readable(&side).await;
        let fourth = next(&mut side).await.expect("data to read");
        assert_eq!(fourth.as_ptr(), second_ptr, "a released buffer is reused");
        assert_eq!(&fourth[..], &[4u8; 10]);
        drop(fourth);
        // Nothing to read: the side lets go of its buffer.
        assert!(next(&mut side).await.is_none());
        assert!(side.last.is_none(), "an idle side holds no buffer");
    }

    /// An echo application: sends back what it reads, and closes its
    /// side once it read EOF (so a lost half-close hangs the test).
    async fn echo_app() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    tokio::io::copy(&mut r, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                });
            }
        });
        addr
    }

    /// The HBONE data path without TLS: client ⇄ [relay] ⇄ h2 streams on
    /// ONE connection ⇄ [relay] ⇄ echo app, as the outbound and inbound
    /// proxies run it. 24 streams at once each send 6 MiB, more than a
    /// stream's window and together far more than the connection's, so
    /// both windows must be released as data is delivered; each stream
    /// half-closes and must get all of its bytes back, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_streams_on_one_h2_connection_carry_large_transfers_and_half_closes() {
        use crate::proxy::tunnel::{CONNECTION_WINDOW, STREAM_WINDOW};
        const STREAMS: usize = 24;
        const SIZE: usize = 6 << 20;
        assert!(SIZE > STREAM_WINDOW as usize);
        assert!(STREAMS * SIZE > 4 * CONNECTION_WINDOW as usize);

        let app = echo_app().await;
        let (client_io, server_io) = pair().await;
        // The inbound side: every CONNECT is relayed to the app.
        tokio::spawn(async move {
            let mut conn = crate::proxy::tunnel::server()
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let mut app = TcpStream::connect(app).await.unwrap();
                    let send = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    let mut tunnel = HboneStream::new(send, req.into_body());
                    let relayed = tcp_to_hbone(&mut app, &mut tunnel).await;
                    assert!(relayed.error.is_none(), "{:?}", relayed.error);
                    assert_eq!(relayed.forward, SIZE as u64);
                });
            }
        });
        let (sender, conn) = crate::proxy::tunnel::client()
            .handshake::<_, Bytes>(client_io)
            .await
            .unwrap();
        tokio::spawn(conn);

        let mut clients = tokio::task::JoinSet::new();
        for n in 0..STREAMS {
            let sender = sender.clone();
            clients.spawn(async move {
                // The outbound side: a local client relayed onto a stream.
                let (mut local, mut captured) = pair().await;
                let mut sender = sender.ready().await.unwrap();
                let request = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri(app.to_string())
                    .body(())
                    .unwrap();
                let (response, send) = sender.send_request(request, false).unwrap();
                let response = response.await.unwrap();
                let mut tunnel = HboneStream::new(send, response.into_body());
                let proxy =
                    tokio::spawn(async move { tcp_to_hbone(&mut captured, &mut tunnel).await });

                let data: Vec<u8> = (0..SIZE).map(|i| ((i * 7 + n) % 253) as u8).collect();
                let (mut r, mut w) = local.split();
                let write = async {
                    w.write_all(&data).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let read = async {
                    let mut got = Vec::with_capacity(SIZE);
                    r.read_to_end(&mut got).await.unwrap();
                    got
                };
                let ((), got) = tokio::join!(write, read);
                assert!(
                    got == data,
                    "stream {n}: the echo differs from what was sent"
                );
                let relayed = proxy.await.unwrap();
                assert!(relayed.error.is_none(), "{:?}", relayed.error);
                assert_eq!(
                    (relayed.forward, relayed.backward),
                    (SIZE as u64, SIZE as u64)
                );
            });
        }
        let all = async {
            while let Some(done) = clients.join_next().await {
                done.unwrap();
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(120), all)
            .await
            .expect("every stream finishes (a window never released would hang here)");
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_an_error() {
        let (client, mut a) = pair().await;
        let (mut b, _server) = pair().await;
        let relay = tokio::spawn(async move { tcp_to_tcp(&mut a, &mut b).await });
        // SO_LINGER 0: close sends RST.
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(client);
        let relayed = tokio::time::timeout(std::time::Duration::from_secs(10), relay)
            .await
            .expect("the relay ends")
            .unwrap();
        assert_eq!(
            relayed.error.map(|e| e.kind()),
            Some(io::ErrorKind::ConnectionReset)
        );
    }
}
