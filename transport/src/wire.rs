//! The framed, versioned wire format.
//!
//! A frame is a 5-byte header — payload length (u32, big endian) and a format version (u8) —
//! followed by the payload, a postcard-encoded message. Every request travels on its own QUIC
//! bi-stream as one frame and is answered by one frame, so a malformed frame fails only its
//! own stream.
//!
//! **Invariant:** a reader never allocates more than its `max_bytes` for a frame: the length is
//! checked before the payload is read.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The format version this build writes and reads.
pub const WIRE_VERSION: u8 = 1;
/// Length of the frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 5;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed or ended early.
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The frame's declared length exceeds the reader's limit.
    #[error("frame of {len} bytes exceeds the limit of {max_bytes} bytes")]
    TooLarge {
        /// Declared payload length.
        len: usize,
        /// The reader's limit.
        max_bytes: usize,
    },
    /// The frame carries a format version this build does not speak.
    #[error("unsupported wire version {got} (this build speaks {WIRE_VERSION})")]
    UnsupportedVersion {
        /// The version found in the header.
        got: u8,
    },
    /// The payload did not decode into the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes `msg` as one frame (header + payload).
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = vec![0u8; FRAME_HEADER_LEN];
    let mut buf = postcard::to_extend(msg, std::mem::take(&mut buf))
        .expect("serializing an in-memory message into a Vec cannot fail");
    let len = u32::try_from(buf.len() - FRAME_HEADER_LEN).expect("frame payload below 4 GiB");
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf[4] = WIRE_VERSION;
    buf
}

/// Writes `msg` as one frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    w.write_all(&encode_frame(msg)).await?;
    Ok(())
}

/// Reads one frame's payload bytes, refusing frames above `max_bytes`.
pub async fn read_frame_bytes<R>(r: &mut R, max_bytes: usize) -> Result<Vec<u8>, WireError>
where
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if header[4] != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion { got: header[4] });
    }
    if len > max_bytes {
        return Err(WireError::TooLarge { len, max_bytes });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(payload)
}

/// Decodes a payload read by [`read_frame_bytes`].
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    postcard::from_bytes(payload).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Reads and decodes one frame.
pub async fn read_frame<R, T>(r: &mut R, max_bytes: usize) -> Result<T, WireError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    decode(&read_frame_bytes(r, max_bytes).await?)
}

/// Takes the end of a stream whose last frame has been read, if the peer's FIN has arrived;
/// returns whether it had. Call it when done with `recv`.
///
/// quinn sends a STOP_SENDING frame for a receive stream dropped before its end was read, even
/// when the FIN is already here (it cannot tell that stream from one still receiving): one
/// more frame, often one more datagram, and a wake-up of the peer's connection, per request.
/// This looks without waiting; a FIN still under way is left to that path.
pub fn take_end(recv: &mut quinn::RecvStream) -> bool {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let mut byte = [0u8; 1];
    let read = std::pin::pin!(recv.read(&mut byte));
    matches!(
        read.poll(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(Ok(None))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frame_round_trip() {
        let msg = (42u64, "hello".to_string(), vec![1u8, 2, 3]);
        let bytes = encode_frame(&msg);
        let got: (u64, String, Vec<u8>) = read_frame(&mut bytes.as_slice(), 1024).await.unwrap();
        assert_eq!(got, msg);
    }

    #[tokio::test]
    async fn oversize_frame_is_refused_before_reading_payload() {
        let mut bytes = encode_frame(&vec![0u8; 100]);
        bytes.truncate(FRAME_HEADER_LEN); // the payload is never read
        let err = read_frame_bytes(&mut bytes.as_slice(), 10)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                WireError::TooLarge {
                    len: 101,
                    max_bytes: 10
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unknown_version_is_refused() {
        let mut bytes = encode_frame(&1u8);
        bytes[4] = 99;
        let err = read_frame_bytes(&mut bytes.as_slice(), 10)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WireError::UnsupportedVersion { got: 99 }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn garbage_payload_is_malformed() {
        let mut bytes = vec![0, 0, 0, 3, WIRE_VERSION];
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = read_frame::<_, (u64, String)>(&mut bytes.as_slice(), 10)
            .await
            .unwrap_err();
        assert!(matches!(err, WireError::Malformed(_)), "{err}");
    }
}
