//! The gRPC codec of the ADS stream: requests are decoded with prost,
//! responses are written from pre-encoded resources.
//!
//! A `DeltaDiscoveryResponse` is a handful of small fields plus a list of
//! `Resource` messages. Those are encoded once, when they enter the cache
//! ([`super::resource`]); this codec splices the shared bytes into each
//! response instead of building and re-encoding prost structs per client.
//! The output is ordinary protobuf that any client decodes as
//! `DeltaDiscoveryResponse`. Nothing here knows about subscriptions.

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use meshbox_proto::xds::DeltaDiscoveryRequest;
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// One resource in a response: its shared encoding plus, for answers to
/// lookups by IP, the lookup keys it answers (`Resource.aliases`).
#[derive(Debug, Clone)]
pub(crate) struct OutResource {
    pub bytes: Bytes,
    pub aliases: Vec<Arc<str>>,
}

/// A `DeltaDiscoveryResponse` whose resources are already encoded.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outbound {
    pub system_version_info: String,
    pub resources: Vec<OutResource>,
    pub type_url: &'static str,
    pub nonce: String,
    pub removed: Vec<Arc<str>>,
}

// Field numbers of DeltaDiscoveryResponse and Resource (see xds.proto).
const RESPONSE_SYSTEM_VERSION: u32 = 1;
const RESPONSE_RESOURCES: u32 = 2;
const RESPONSE_TYPE_URL: u32 = 4;
const RESPONSE_NONCE: u32 = 5;
const RESPONSE_REMOVED: u32 = 6;
const RESOURCE_ALIASES: u32 = 4;
const LENGTH_DELIMITED: u32 = 2;

impl Outbound {
    pub(crate) fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }

    /// The exact number of bytes [`Outbound::write`] produces.
    pub(crate) fn encoded_len(&self) -> usize {
        let mut len = string_field_len(&self.system_version_info)
            + string_field_len(self.type_url)
            + string_field_len(&self.nonce);
        for r in &self.resources {
            len += field_len(r.body_len());
        }
        for name in &self.removed {
            len += field_len(name.len());
        }
        len
    }

    pub(crate) fn write(&self, buf: &mut impl BufMut) {
        put_string(buf, RESPONSE_SYSTEM_VERSION, &self.system_version_info);
        for r in &self.resources {
            put_key(buf, RESPONSE_RESOURCES);
            put_varint(buf, r.body_len() as u64);
            buf.put_slice(&r.bytes);
            for alias in &r.aliases {
                put_key(buf, RESOURCE_ALIASES);
                put_varint(buf, alias.len() as u64);
                buf.put_slice(alias.as_bytes());
            }
        }
        put_string(buf, RESPONSE_TYPE_URL, self.type_url);
        put_string(buf, RESPONSE_NONCE, &self.nonce);
        for name in &self.removed {
            // Repeated: written even when empty, unlike singular strings.
            put_key(buf, RESPONSE_REMOVED);
            put_varint(buf, name.len() as u64);
            buf.put_slice(name.as_bytes());
        }
    }
}

impl OutResource {
    /// Length of the embedded `Resource`: the shared encoding followed by
    /// the alias fields (protobuf merges fields appended to a message).
    fn body_len(&self) -> usize {
        self.bytes.len()
            + self
                .aliases
                .iter()
                .map(|a| field_len(a.len()))
                .sum::<usize>()
    }
}

fn put_key(buf: &mut impl BufMut, field: u32) {
    // Every field number used here is below 16, so the key is one byte.
    debug_assert!(field < 16);
    buf.put_u8(((field << 3) | LENGTH_DELIMITED) as u8);
}

fn put_string(buf: &mut impl BufMut, field: u32, value: &str) {
    // proto3 leaves a singular field at its default value off the wire.
    if !value.is_empty() {
        put_key(buf, field);
        put_varint(buf, value.len() as u64);
        buf.put_slice(value.as_bytes());
    }
}

fn put_varint(buf: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

fn varint_len(value: u64) -> usize {
    // 1 byte per 7 significant bits, at least one.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

fn field_len(body: usize) -> usize {
    1 + varint_len(body as u64) + body
}

fn string_field_len(value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        field_len(value.len())
    }
}

/// The codec tonic drives for `DeltaAggregatedResources`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AdsCodec;

impl Codec for AdsCodec {
    type Encode = Outbound;
    type Decode = DeltaDiscoveryRequest;
    type Encoder = AdsEncoder;
    type Decoder = AdsDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        AdsEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        AdsDecoder
    }
}

#[derive(Debug)]
pub(crate) struct AdsEncoder;

impl Encoder for AdsEncoder {
    type Item = Outbound;
    type Error = Status;

    fn encode(&mut self, item: Outbound, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.write(dst);
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) struct AdsDecoder;

impl Decoder for AdsDecoder {
    type Item = DeltaDiscoveryRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        DeltaDiscoveryRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed DeltaDiscoveryRequest: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshbox_proto::xds::{DeltaDiscoveryResponse, Resource};

    #[test]
    fn spliced_response_decodes_as_the_real_message() {
        let resource = Resource {
            name: "ns/a".into(),
            version: "v1".into(),
            resource: Some(prost_types::Any {
                type_url: "t".into(),
                value: vec![7; 300],
            }),
            ..Default::default()
        };
        let out = Outbound {
            system_version_info: "12".into(),
            resources: vec![
                OutResource {
                    bytes: Bytes::from(resource.encode_to_vec()),
                    aliases: vec!["/10.0.0.1".into(), "net/10.0.0.1".into()],
                },
                OutResource {
                    bytes: Bytes::from(resource.encode_to_vec()),
                    aliases: vec![],
                },
            ],
            type_url: "type.googleapis.com/x",
            nonce: "5".into(),
            removed: vec!["gone".into(), "".into()],
        };
        let mut buf = Vec::new();
        out.write(&mut buf);
        assert_eq!(buf.len(), out.encoded_len());
        let decoded = DeltaDiscoveryResponse::decode(buf.as_slice()).unwrap();
        assert_eq!(decoded.system_version_info, "12");
        assert_eq!(decoded.type_url, "type.googleapis.com/x");
        assert_eq!(decoded.nonce, "5");
        assert_eq!(decoded.removed_resources, vec!["gone", ""]);
        assert_eq!(decoded.resources.len(), 2);
        let mut with_aliases = resource.clone();
        with_aliases.aliases = vec!["/10.0.0.1".into(), "net/10.0.0.1".into()];
        assert_eq!(decoded.resources[0], with_aliases);
        assert_eq!(decoded.resources[1], resource);
    }

    /// Fixed encodings from the protobuf spec (300 is its worked example),
    /// so a bug shared by `put_varint` and `varint_len` cannot pass.
    #[test]
    fn varint_encodings_and_lengths() {
        let cases: [(u64, &[u8]); 9] = [
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (u32::MAX as u64, &[0xff, 0xff, 0xff, 0xff, 0x0f]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for (v, expected) in cases {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf, expected, "encoding of {v}");
            assert_eq!(varint_len(v), expected.len(), "length of {v}");
        }
    }
}
