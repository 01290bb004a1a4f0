//! The WebSocket frame codec (RFC 6455, section 5), written by hand so that a connection holds
//! no buffer while it is idle: frames are read from a buffer the caller owns only while the
//! socket is readable, and server frames are a header of at most 10 bytes written in front of
//! a shared payload.
//!
//! Server frames are never masked, never fragmented and use no extension. Client frames must be
//! masked; fragmented messages are reassembled up to the message size limit.

/// Frame opcodes.
pub(super) mod opcode {
    pub(crate) const CONTINUATION: u8 = 0x0;
    pub(crate) const TEXT: u8 = 0x1;
    pub(crate) const BINARY: u8 = 0x2;
    pub(crate) const CLOSE: u8 = 0x8;
    pub(crate) const PING: u8 = 0x9;
    pub(crate) const PONG: u8 = 0xA;
}

/// Longest server frame header: 2 bytes and a 64-bit length.
pub(super) const MAX_HEADER: usize = 10;

/// The header of a final, unmasked server frame of `opcode` carrying `len` payload bytes.
pub(super) fn header(opcode: u8, len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut header = [0u8; MAX_HEADER];
    header[0] = 0x80 | opcode;
    let used = if len < 126 {
        header[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        header[1] = 126;
        header[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (header, used)
}

/// A close frame's payload: the code, then the reason.
pub(super) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// What a client sent, once whole.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Event {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    /// The client closes, with its code if it gave one.
    Close(Option<u16>),
}

/// Why the client's bytes cannot be read any further; each has its close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Violation {
    /// 1002.
    Protocol,
    /// 1007: a text message that is not UTF-8.
    InvalidUtf8,
    /// 1009: a message or frame over the size limit.
    TooBig,
}

/// Reassembles client frames into [`Event`]s.
#[derive(Debug)]
pub(super) struct Decoder {
    max_message: usize,
    /// The opcode and payload so far of a fragmented message.
    /// Boxed: rare, and the idle connection's task keeps a pointer rather than the whole.
    fragments: Option<Box<(u8, Vec<u8>)>>,
}

/// A parsed frame header.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
    size: usize,
}

fn parse_header(buf: &[u8], max_message: usize) -> Result<Option<Header>, Violation> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        // No extension was negotiated.
        return Err(Violation::Protocol);
    }
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
    if b1 & 0x80 == 0 {
        // Client frames must be masked.
        return Err(Violation::Protocol);
    }
    let (len, at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(bytes) => (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(bytes) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(bytes);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(Violation::Protocol);
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        short => (u64::from(short), 2),
    };
    if opcode >= opcode::CLOSE {
        if !fin || len > 125 || opcode > opcode::PONG {
            return Err(Violation::Protocol);
        }
    } else if opcode > opcode::BINARY {
        return Err(Violation::Protocol);
    } else if len > max_message as u64 {
        return Err(Violation::TooBig);
    }
    let Some(mask) = buf.get(at..at + 4) else { return Ok(None) };
    Ok(Some(Header {
        fin,
        opcode,
        mask: [mask[0], mask[1], mask[2], mask[3]],
        // At most `max_message` or 125 here.
        len: len as usize,
        size: at + 4,
    }))
}

fn unmask(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect()
}

impl Decoder {
    pub(super) fn new(max_message: usize) -> Self {
        Self { max_message, fragments: None }
    }

    /// Decodes the complete frames at the start of `buf` into `events`; returns how many bytes
    /// they took. The rest is an incomplete frame, to be decoded again with more bytes.
    ///
    /// # Errors
    /// The first [`Violation`]; the connection must then be closed with its code.
    pub(super) fn decode(&mut self, buf: &[u8], events: &mut Vec<Event>) -> Result<usize, Violation> {
        let mut used = 0;
        loop {
            let rest = &buf[used..];
            let Some(header) = parse_header(rest, self.max_message)? else { return Ok(used) };
            let fragmented = self.fragments.as_deref().map_or(0, |(_, f)| f.len());
            if header.opcode < opcode::CLOSE && fragmented + header.len > self.max_message {
                return Err(Violation::TooBig);
            }
            let Some(payload) = rest.get(header.size..header.size + header.len) else { return Ok(used) };
            used += header.size + header.len;
            let payload = unmask(payload, header.mask);
            match header.opcode {
                opcode::PING => events.push(Event::Ping(payload)),
                opcode::PONG => events.push(Event::Pong),
                opcode::CLOSE => {
                    events.push(Event::Close(close_code(&payload)?));
                    return Ok(used);
                }
                opcode::CONTINUATION => {
                    let Some((_, fragments)) = self.fragments.as_deref_mut() else {
                        return Err(Violation::Protocol);
                    };
                    fragments.extend_from_slice(&payload);
                    if header.fin
                        && let Some((kind, message)) = self.fragments.take().map(|f| *f)
                    {
                        events.push(message_event(kind, message)?);
                    }
                }
                kind => {
                    if self.fragments.is_some() {
                        // A new message inside a fragmented one.
                        return Err(Violation::Protocol);
                    }
                    if header.fin {
                        events.push(message_event(kind, payload)?);
                    } else {
                        self.fragments = Some(Box::new((kind, payload)));
                    }
                }
            }
        }
    }
}

fn message_event(kind: u8, payload: Vec<u8>) -> Result<Event, Violation> {
    if kind == opcode::TEXT {
        String::from_utf8(payload).map(Event::Text).map_err(|_| Violation::InvalidUtf8)
    } else {
        Ok(Event::Binary(payload))
    }
}

/// The code of a client's close frame: none, or a code a peer may send (RFC 6455, 7.4) with a
/// UTF-8 reason.
fn close_code(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::Protocol),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(Violation::Protocol);
            }
            std::str::from_utf8(reason).map_err(|_| Violation::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> Result<Vec<Event>, Violation> {
        let mut events = Vec::new();
        let used = decoder.decode(bytes, &mut events)?;
        assert_eq!(used, bytes.len(), "every frame complete");
        Ok(events)
    }

    #[test]
    fn server_headers_use_the_shortest_length_form() {
        assert_eq!(header(opcode::TEXT, 5), ([0x81, 5, 0, 0, 0, 0, 0, 0, 0, 0], 2));
        assert_eq!(header(opcode::TEXT, 300).1, 4);
        assert_eq!(&header(opcode::TEXT, 300).0[..4], &[0x81, 126, 1, 44]);
        assert_eq!(header(opcode::BINARY, 70_000).1, 10);
        assert_eq!(&header(opcode::PING, 0).0[..2], &[0x89, 0]);
    }

    #[test]
    fn frames_split_anywhere_decode_the_same() {
        let mut bytes = client(true, opcode::TEXT, b"hello");
        bytes.extend(client(true, opcode::PING, b"p"));
        bytes.extend(client(true, opcode::TEXT, &vec![b'a'; 300]));
        bytes.extend(client(true, opcode::BINARY, &[1, 2, 3]));
        bytes.extend(client(true, opcode::PONG, b""));
        for split in 0..bytes.len() {
            let mut decoder = Decoder::new(1024);
            let mut events = Vec::new();
            let used = decoder.decode(&bytes[..split], &mut events).expect("valid");
            let mut rest = bytes[used..split].to_vec();
            rest.extend_from_slice(&bytes[split..]);
            let used = decoder.decode(&rest, &mut events).expect("valid");
            assert_eq!(used, rest.len());
            assert_eq!(
                events,
                [
                    Event::Text("hello".into()),
                    Event::Ping(b"p".to_vec()),
                    Event::Text("a".repeat(300)),
                    Event::Binary(vec![1, 2, 3]),
                    Event::Pong
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn fragmented_messages_are_reassembled_around_control_frames() {
        let mut bytes = client(false, opcode::TEXT, b"hel");
        bytes.extend(client(true, opcode::PING, b""));
        bytes.extend(client(false, opcode::CONTINUATION, b"l"));
        bytes.extend(client(true, opcode::CONTINUATION, b"o"));
        let events = decode_all(&mut Decoder::new(1024), &bytes).expect("valid");
        assert_eq!(events, [Event::Ping(vec![]), Event::Text("hello".into())]);
    }

    #[test]
    fn violations_are_reported_with_their_kind() {
        let too_big = client(true, opcode::TEXT, &[b'a'; 101]);
        assert_eq!(decode_all(&mut Decoder::new(100), &too_big), Err(Violation::TooBig));
        // The size is refused from the header, before the payload arrives.
        assert_eq!(Decoder::new(100).decode(&too_big[..8], &mut Vec::new()), Err(Violation::TooBig));
        let mut fragments = client(false, opcode::TEXT, &[b'a'; 60]);
        fragments.extend(client(true, opcode::CONTINUATION, &[b'a'; 60]));
        assert_eq!(decode_all(&mut Decoder::new(100), &fragments), Err(Violation::TooBig));
        let invalid_utf8 = client(true, opcode::TEXT, &[0xff, 0xfe]);
        assert_eq!(decode_all(&mut Decoder::new(100), &invalid_utf8), Err(Violation::InvalidUtf8));
        let mut unmasked = client(true, opcode::TEXT, b"x");
        unmasked[1] &= 0x7F;
        assert_eq!(decode_all(&mut Decoder::new(100), &unmasked), Err(Violation::Protocol));
        let mut rsv = client(true, opcode::TEXT, b"x");
        rsv[0] |= 0x40;
        assert_eq!(decode_all(&mut Decoder::new(100), &rsv), Err(Violation::Protocol));
        for bad in [
            client(true, 0x3, b"x"),
            client(false, opcode::PING, b""),
            client(true, opcode::PING, &[0; 126]),
            client(true, opcode::CONTINUATION, b"x"),
            client(true, opcode::CLOSE, &[3]),
            client(true, opcode::CLOSE, &1005u16.to_be_bytes()),
        ] {
            assert_eq!(decode_all(&mut Decoder::new(1000), &bad), Err(Violation::Protocol), "{bad:?}");
        }
        let mut nested = client(false, opcode::TEXT, b"a");
        nested.extend(client(true, opcode::TEXT, b"b"));
        assert_eq!(decode_all(&mut Decoder::new(100), &nested), Err(Violation::Protocol));
    }

    #[test]
    fn a_close_frame_ends_decoding_and_carries_its_code() {
        let mut bytes = client(true, opcode::CLOSE, &close_payload(4000, "bye"));
        let close_len = bytes.len();
        bytes.extend(client(true, opcode::TEXT, b"after"));
        let mut events = Vec::new();
        let used = Decoder::new(100).decode(&bytes, &mut events).expect("valid");
        assert_eq!((used, events), (close_len, vec![Event::Close(Some(4000))]));
        assert_eq!(
            decode_all(&mut Decoder::new(100), &client(true, opcode::CLOSE, b"")),
            Ok(vec![Event::Close(None)])
        );
    }
}

/// Property tests of the decoder: whatever the bytes, it never panics and never claims more
/// than it was given; valid frames decode to the same events however the stream is split.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// A masked client frame with the given mask.
    fn client(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    /// A valid message: text or binary, split into 1 to 3 fragments, with a ping between them.
    fn message() -> impl Strategy<Value = (Vec<u8>, Event)> {
        (any::<bool>(), "[ -~]{0,300}", 1usize..4, any::<[u8; 4]>()).prop_map(|(text, body, parts, mask)| {
            let payload = body.as_bytes();
            let kind = if text { opcode::TEXT } else { opcode::BINARY };
            let size = payload.len().div_ceil(parts).max(1);
            let chunks: Vec<&[u8]> =
                if payload.is_empty() { vec![&[][..]] } else { payload.chunks(size).collect() };
            let mut bytes = Vec::new();
            for (i, chunk) in chunks.iter().enumerate() {
                let op = if i == 0 { kind } else { opcode::CONTINUATION };
                bytes.extend(client(i + 1 == chunks.len(), op, chunk, mask));
                if i == 0 && chunks.len() > 1 {
                    bytes.extend(client(true, opcode::PING, b"p", mask));
                }
            }
            let event = if text { Event::Text(body) } else { Event::Binary(body.into_bytes()) };
            (bytes, event)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn fuzz_frame_decoder_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600), max in 0usize..400) {
            let mut decoder = Decoder::new(max);
            let mut events = Vec::new();
            if let Ok(used) = decoder.decode(&bytes, &mut events) {
                prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn valid_frames_decode_the_same_however_the_stream_is_split(
            messages in proptest::collection::vec(message(), 1..5),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let stream: Vec<u8> = messages.iter().flat_map(|(bytes, _)| bytes.clone()).collect();
            let expected: Vec<&Event> = messages.iter().map(|(_, event)| event).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut decoder = Decoder::new(1024);
            let (mut events, mut pending, mut from) = (Vec::new(), Vec::new(), 0);
            for cut in cuts {
                pending.extend_from_slice(&stream[from..cut]);
                from = cut;
                let used = decoder.decode(&pending, &mut events).expect("valid frames");
                pending.drain(..used);
            }
            prop_assert!(pending.is_empty());
            let data: Vec<&Event> = events.iter().filter(|e| !matches!(e, Event::Ping(_))).collect();
            prop_assert_eq!(data, expected);
        }
    }
}
