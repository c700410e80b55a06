//! Reading NDJSON fast: lines out of large buffered reads, with no copy
//! unless a line straddles two reads.

use std::io::{self, Read};

/// Size of each read.
const CHUNK: usize = 1 << 20;

/// Yields the lines of a reader (without `\n` or a trailing `\r`), with
/// their 1-based line numbers.
pub struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Start of unread data in `buf`.
    pos: usize,
    /// End of valid data in `buf`.
    end: usize,
    eof: bool,
    line_no: u64,
}

impl<R: Read> LineReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R) -> Self {
        LineReader {
            inner,
            buf: vec![0; CHUNK],
            pos: 0,
            end: 0,
            eof: false,
            line_no: 0,
        }
    }

    /// The next line and its number, or `None` at the end.
    pub fn next_line(&mut self) -> io::Result<Option<(u64, &[u8])>> {
        loop {
            if let Some(nl) = memchr::memchr(b'\n', &self.buf[self.pos..self.end]) {
                let start = self.pos;
                self.pos += nl + 1;
                self.line_no += 1;
                return Ok(Some((self.line_no, trim_cr(&self.buf[start..start + nl]))));
            }
            if self.eof {
                if self.pos < self.end {
                    let start = self.pos;
                    self.pos = self.end;
                    self.line_no += 1;
                    return Ok(Some((self.line_no, trim_cr(&self.buf[start..self.end]))));
                }
                return Ok(None);
            }
            // Move the partial line to the front, grow if one line fills the buffer, and read more.
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = loop {
                match self.inner.read(&mut self.buf[self.end..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                self.eof = true;
            }
            self.end += n;
        }
    }
}

/// The lines of an in-memory (or memory-mapped) NDJSON text, with their
/// 1-based numbers; the same lines [`LineReader`] yields.
pub fn lines(text: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut pos = 0usize;
    let mut line_no = 0u64;
    std::iter::from_fn(move || {
        if pos >= text.len() {
            return None;
        }
        let end = memchr::memchr(b'\n', &text[pos..]).map_or(text.len(), |n| pos + n);
        let line = trim_cr(&text[pos..end]);
        pos = end + 1;
        line_no += 1;
        Some((line_no, line))
    })
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut r = LineReader::new(input);
        let mut out = vec![];
        while let Some((n, l)) = r.next_line().unwrap() {
            out.push((n, l.to_vec()));
        }
        out
    }

    #[test]
    fn splits_lines_keeps_numbers_and_handles_crlf_and_no_final_newline() {
        assert_eq!(
            lines(b"a\r\nbb\n\nccc"),
            vec![
                (1, b"a".to_vec()),
                (2, b"bb".to_vec()),
                (3, b"".to_vec()),
                (4, b"ccc".to_vec())
            ]
        );
        assert!(lines(b"").is_empty());
    }

    #[test]
    fn in_memory_lines_match_the_reader() {
        for input in [&b"a\r\nbb\n\nccc"[..], b"", b"x\n", b"\n\n"] {
            let mem: Vec<(u64, Vec<u8>)> =
                super::lines(input).map(|(n, l)| (n, l.to_vec())).collect();
            assert_eq!(mem, lines(input), "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn lines_longer_than_a_chunk_and_straddling_reads() {
        let long = vec![b'x'; CHUNK * 2 + 17];
        let mut input = b"first\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nlast\n");
        let got = lines(&input);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].1.len(), long.len());
        assert_eq!(got[2], (3, b"last".to_vec()));
    }
}
