//! Is what a client sends inside a CONNECT stream HTTP? The waypoint looks
//! at the first bytes: an HTTP/2 connection preface, or an HTTP/1 request
//! line's method followed by a space. Anything else is proxied as TCP, with
//! L4 policy only, as Istio's waypoint does.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longer than any method a client uses.
const MAX_METHOD: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http,
    Tcp,
}

/// Classifies a prefix; `None`: not enough bytes yet.
pub fn classify(prefix: &[u8]) -> Option<Detected> {
    if prefix.is_empty() {
        return None;
    }
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        // `PRI` is also a method token: keep reading until it differs.
        return (n == H2_PREFACE.len()).then_some(Detected::Http);
    }
    for (i, b) in prefix.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD => {}
            b' ' if i > 0 => return Some(Detected::Http),
            _ => return Some(Detected::Tcp),
        }
    }
    None
}

/// Reads until the stream can be classified. A client that sends nothing
/// for `first_byte` is TCP (server-first protocols); one that stops
/// mid-method is TCP too, which only ever gets L4 policy.
pub async fn detect<T: AsyncRead + Unpin>(
    io: &mut T,
    first_byte: Duration,
) -> io::Result<(Bytes, Detected)> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    loop {
        let wait = if buf.is_empty() {
            first_byte
        } else {
            Duration::from_secs(1)
        };
        let mut chunk = [0u8; 32];
        let n = match tokio::time::timeout(wait, io.read(&mut chunk)).await {
            Ok(read) => read?,
            Err(_) => return Ok((buf.freeze(), Detected::Tcp)),
        };
        if n == 0 {
            return Ok((buf.freeze(), Detected::Tcp));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(d) = classify(&buf) {
            return Ok((buf.freeze(), d));
        }
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
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

    #[test]
    fn http_and_tcp_are_told_apart() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"POST "), Some(Detected::Http));
        assert_eq!(classify(b"M-SEARCH "), Some(Detected::Http));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http));
        assert_eq!(classify(b"PRI /x"), Some(Detected::Http));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tcp), "TLS");
        assert_eq!(
            classify(b"get / "),
            Some(Detected::Tcp),
            "methods are upper case"
        );
        assert_eq!(classify(b" GET"), Some(Detected::Tcp));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Detected::Tcp));
        assert_eq!(
            classify(&[b'A'; 30]),
            Some(Detected::Tcp),
            "no method is that long"
        );
    }

    #[tokio::test]
    async fn silence_is_tcp_and_prefix_is_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let (prefix, d) = detect(&mut server, Duration::from_millis(50))
            .await
            .expect("io");
        assert_eq!((prefix.len(), d), (0, Detected::Tcp));
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET /x HTTP/1.1\r\n")
            .await
            .expect("write");
        let (prefix, d) = detect(&mut server, Duration::from_secs(5))
            .await
            .expect("io");
        assert_eq!(d, Detected::Http);
        let mut replay = Prefixed::new(prefix, server);
        let mut line = vec![0u8; 17];
        replay.read_exact(&mut line).await.expect("read");
        assert_eq!(&line, b"GET /x HTTP/1.1\r\n");
    }
}
