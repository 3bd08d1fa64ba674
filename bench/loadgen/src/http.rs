//! Just enough HTTP/1.1 response parsing to know where a response ends.

/// How far a buffer holds a response.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A whole response of `len` bytes.
    Complete {
        status: u16,
        len: usize,
        keep_alive: bool,
    },
    /// Not a response this tool can delimit.
    Invalid(&'static str),
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses the response at the start of `buf`.
pub fn parse_response(buf: &[u8]) -> Parsed {
    let Some(head_len) = find(buf, b"\r\n\r\n").map(|i| i + 4) else {
        return if buf.len() > 64 * 1024 {
            Parsed::Invalid("head over 64 KiB")
        } else {
            Parsed::Incomplete
        };
    };
    let head = &buf[..head_len];
    let http10 = head.starts_with(b"HTTP/1.0 ");
    if !(http10 || head.starts_with(b"HTTP/1.1 ")) || head.len() < 12 {
        return Parsed::Invalid("no HTTP/1.x status line");
    }
    let Some(status) = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
    else {
        return Parsed::Invalid("bad status code");
    };
    let (mut length, mut chunked, mut keep_alive) = (None, false, !http10);
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            match std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
            {
                Some(n) => length = Some(n),
                None => return Parsed::Invalid("bad Content-Length"),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value.to_ascii_lowercase().ends_with(b"chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            let v = value.to_ascii_lowercase();
            if find(&v, b"close").is_some() {
                keep_alive = false;
            } else if find(&v, b"keep-alive").is_some() {
                keep_alive = true;
            }
        }
    }
    let body_len = if status == 204 || status == 304 || (100..200).contains(&status) {
        Some(0)
    } else if chunked {
        match chunked_len(&buf[head_len..]) {
            Ok(Some(n)) => Some(n),
            Ok(None) => return Parsed::Incomplete,
            Err(why) => return Parsed::Invalid(why),
        }
    } else {
        match length {
            Some(n) => Some(n),
            None => return Parsed::Invalid("no Content-Length and not chunked"),
        }
    };
    match body_len {
        Some(n) if buf.len() >= head_len + n => Parsed::Complete {
            status,
            len: head_len + n,
            keep_alive,
        },
        _ => Parsed::Incomplete,
    }
}

/// Length of a complete chunked body at the start of `body`, trailers included.
fn chunked_len(body: &[u8]) -> Result<Option<usize>, &'static str> {
    let mut pos = 0;
    loop {
        let Some(eol) = find(&body[pos..], b"\r\n") else {
            return Ok(None);
        };
        let size_field = &body[pos..pos + eol];
        let size_hex = size_field
            .split(|&b| b == b';')
            .next()
            .unwrap_or(size_field)
            .trim_ascii();
        let size = std::str::from_utf8(size_hex)
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or("bad chunk size")?;
        pos += eol + 2;
        if size == 0 {
            // Trailer fields, then the empty line.
            loop {
                let Some(eol) = find(&body[pos..], b"\r\n") else {
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        let end = pos
            .checked_add(size)
            .and_then(|e| e.checked_add(2))
            .ok_or("chunk too large")?;
        if body.len() < end {
            return Ok(None);
        }
        if &body[end - 2..end] != b"\r\n" {
            return Err("chunk not followed by CRLF");
        }
        pos = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(status: u16, len: usize, keep_alive: bool) -> Parsed {
        Parsed::Complete {
            status,
            len,
            keep_alive,
        }
    }

    #[test]
    fn content_length_delimits_and_keep_alive_follows_the_version() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(parse_response(r), complete(200, r.len(), true));
        assert_eq!(parse_response(&r[..r.len() - 1]), Parsed::Incomplete);
        assert_eq!(parse_response(&r[..10]), Parsed::Incomplete);
        let r = b"HTTP/1.0 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(parse_response(r), complete(503, r.len(), false));
        let r = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(r), complete(200, r.len(), false));
    }

    #[test]
    fn chunked_bodies_end_after_the_last_chunk_and_trailers() {
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nok\r\n0\r\nT: 1\r\n\r\n";
        assert_eq!(parse_response(r), complete(200, r.len(), true));
        for cut in [r.len() - 1, r.len() - 8, r.len() - 14] {
            assert_eq!(
                parse_response(&r[..cut]),
                Parsed::Incomplete,
                "cut at {cut}"
            );
        }
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n";
        assert_eq!(parse_response(bad), Parsed::Invalid("bad chunk size"));
    }

    #[test]
    fn what_cannot_be_delimited_is_invalid() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n\r\n"),
            Parsed::Invalid("no Content-Length and not chunked")
        );
        assert_eq!(
            parse_response(b"SSH-2.0-x\r\n\r\n"),
            Parsed::Invalid("no HTTP/1.x status line")
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 2x0 OK\r\n\r\n"),
            Parsed::Invalid("bad status code")
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
            Parsed::Invalid("bad Content-Length")
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 204 No Content\r\n\r\n"),
            complete(204, 27, true)
        );
    }
}
