//! Server-sent events framing that keeps every byte: the relay forwards events exactly as the
//! provider wrote them and only needs to know where each one ends and what it says.
//!
//! An event ends at an empty line; lines end in `\n`, `\r\n` or `\r` (WHATWG HTML, "event
//! stream interpretation"). A `\r` at the end of a chunk waits for the next chunk, since it may
//! be the first half of `\r\n`.

/// Splits a byte stream into raw events.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Start of the line being scanned.
    line: usize,
}

impl Framer {
    /// Appends `chunk` and returns every event it completes, raw (terminating blank line included).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(chunk);
        self.drain(false)
    }

    /// At the end of the stream: completes an event whose last line ended in a lone `\r`.
    pub fn finish(&mut self) -> Vec<Vec<u8>> {
        self.drain(true)
    }

    fn drain(&mut self, eof: bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(rel) = self.buf[self.line..]
            .iter()
            .position(|b| *b == b'\n' || *b == b'\r')
        {
            let at = self.line + rel;
            let end = match self.buf[at] {
                b'\r' => match self.buf.get(at + 1) {
                    None if eof => at + 1,
                    None => break,
                    Some(b'\n') => at + 2,
                    Some(_) => at + 1,
                },
                _ => at + 1,
            };
            let empty = at == self.line;
            self.line = end;
            if empty {
                let rest = self.buf.split_off(end);
                out.push(std::mem::replace(&mut self.buf, rest));
                self.line = 0;
            }
        }
        out
    }

    /// Bytes of an unfinished event (what a stream cut midway left).
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Takes the unfinished bytes, leaving the framer empty.
    pub fn take_pending(&mut self) -> Vec<u8> {
        self.line = 0;
        std::mem::take(&mut self.buf)
    }
}

/// One event's fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `event:`; None means `message`.
    pub event: Option<String>,
    /// `data:` lines joined with `\n`.
    pub data: String,
}

/// Parses a raw event (as [`Framer::push`] returns it).
pub fn parse(raw: &[u8]) -> Event {
    let text = String::from_utf8_lossy(raw);
    let mut ev = Event::default();
    let mut data: Vec<&str> = Vec::new();
    for line in text.split(['\n', '\r']).filter(|l| !l.is_empty()) {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => ev.event = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    ev.data = data.join("\n");
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_across_every_split_and_line_ending() {
        let streams: [&[u8]; 3] = [
            b"data: {\"a\":1}\n\ndata: [DONE]\n\n",
            b"data: {\"a\":1}\r\n\r\ndata: [DONE]\r\n\r\n",
            b"event: x\rdata: {\"a\":1}\r\rdata: [DONE]\r\r",
        ];
        for s in streams {
            // Every split point, to catch state kept across chunks.
            for cut in 0..=s.len() {
                let mut f = Framer::default();
                let mut events = f.push(&s[..cut]);
                events.extend(f.push(&s[cut..]));
                events.extend(f.finish());
                assert_eq!(events.concat(), s, "cut at {cut}");
                assert_eq!(events.len(), 2, "cut at {cut}: {events:?}");
                assert_eq!(parse(&events[0]).data, "{\"a\":1}");
                assert_eq!(parse(&events[1]).data, "[DONE]");
                assert!(f.pending().is_empty());
            }
        }
    }

    #[test]
    fn cut_stream_leaves_pending_bytes() {
        let mut f = Framer::default();
        let e = f.push(b"data: {\"a\":1}\n\ndata: {\"b\"");
        assert_eq!(e.len(), 1);
        assert_eq!(f.pending(), b"data: {\"b\"");
    }

    #[test]
    fn parse_fields() {
        let e = parse(b": comment\nevent: message_delta\ndata: a\ndata:b\nid: 7\n\n");
        assert_eq!(e.event.as_deref(), Some("message_delta"));
        assert_eq!(e.data, "a\nb");
    }
}
