//! Cutting a document into chunks: paragraphs (separated by a blank line) are gathered while
//! they fit in `max_bytes`; a paragraph longer than that is cut at the last whitespace before
//! the limit (or, with none, at the last character boundary). Deterministic: the same text and
//! limit always give the same chunks, so chunk ids are stable.

use crate::format::Chunk;

/// The smallest `max_bytes` accepted (a chunk must hold at least a few words).
pub const MIN_MAX_BYTES: usize = 64;
/// The default `max_bytes`.
pub const DEFAULT_MAX_BYTES: usize = 1500;

/// Byte spans of the non-blank paragraphs of `text` (trailing whitespace excluded).
fn paragraphs(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start: Option<usize> = None;
    let mut end = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let content = line.trim_end();
        if content.trim().is_empty() {
            if let Some(s) = start.take() {
                spans.push((s, end));
            }
        } else {
            if start.is_none() {
                start = Some(offset + (line.len() - line.trim_start().len()));
            }
            end = offset + content.len();
        }
        offset += line.len();
    }
    if let Some(s) = start {
        spans.push((s, end));
    }
    spans
}

/// Cuts `text[start..end]` (longer than `max`) into pieces of at most `max` bytes.
fn split_long(text: &str, mut start: usize, end: usize, max: usize, out: &mut Vec<(usize, usize)>) {
    while end - start > max {
        let mut limit = start + max;
        while !text.is_char_boundary(limit) {
            limit -= 1;
        }
        let window = &text[start..limit];
        let cut = window
            .rfind(char::is_whitespace)
            .filter(|&i| i > 0)
            .map_or(limit, |i| start + i);
        out.push((start, cut));
        // Skip the whitespace the cut fell on.
        start = cut + text[cut..end].len() - text[cut..end].trim_start().len();
    }
    if end > start {
        out.push((start, end));
    }
}

/// The chunks of document `path`, ids `<path>#0`, `<path>#1`, …
pub fn chunk_document(path: &str, text: &str, max_bytes: usize) -> Vec<Chunk> {
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for (s, e) in paragraphs(text) {
        if let Some((cs, ce)) = current {
            if e - cs <= max_bytes {
                current = Some((cs, e));
                continue;
            }
            spans.push((cs, ce));
            current = None;
        }
        if e - s <= max_bytes {
            current = Some((s, e));
        } else {
            split_long(text, s, e, max_bytes, &mut spans);
        }
    }
    spans.extend(current);
    spans
        .into_iter()
        .enumerate()
        .map(|(n, (start, end))| Chunk {
            id: format!("{path}#{n}"),
            document: path.to_owned(),
            start,
            end,
            text: text[start..end].to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(chunks: &[Chunk]) -> Vec<&str> {
        chunks.iter().map(|c| c.text.as_str()).collect()
    }

    #[test]
    fn gathers_paragraphs_that_fit_and_keeps_offsets() {
        let text = "Refunds take 30 days.\n\nShipping is free.\n\n\nReturns need a receipt.\n";
        let chunks = chunk_document("faq.md", text, 80);
        assert_eq!(
            texts(&chunks),
            ["Refunds take 30 days.\n\nShipping is free.\n\n\nReturns need a receipt."]
        );
        let chunks = chunk_document("faq.md", text, 40);
        assert_eq!(
            texts(&chunks),
            [
                "Refunds take 30 days.\n\nShipping is free.",
                "Returns need a receipt."
            ]
        );
        for c in &chunks {
            assert_eq!(&text[c.start..c.end], c.text);
        }
        assert_eq!(chunks[1].id, "faq.md#1");
    }

    #[test]
    fn cuts_long_paragraphs_at_whitespace_and_char_boundaries() {
        let text = "word ".repeat(40);
        let chunks = chunk_document("a.txt", &text, 64);
        assert!(
            chunks
                .iter()
                .all(|c| c.text.len() <= 64 && !c.text.starts_with(' '))
        );
        let joined: Vec<&str> = chunks
            .iter()
            .flat_map(|c| c.text.split_whitespace())
            .collect();
        assert_eq!(joined.len(), 40);
        let wide = "é".repeat(100); // 200 bytes, no whitespace
        let chunks = chunk_document("b.txt", &wide, 65);
        assert!(chunks.iter().all(|c| c.text.len() <= 65));
        assert_eq!(chunks.iter().map(|c| c.text.len()).sum::<usize>(), 200);
    }

    #[test]
    fn blank_documents_have_no_chunks() {
        assert!(chunk_document("e.md", " \n\n\t\n", 100).is_empty());
    }
}
