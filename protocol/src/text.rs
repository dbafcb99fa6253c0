//! Text from a peer: the limits a hello's fields must keep, and control characters made
//! visible, so a name cannot steer the terminal or the log it is shown in.
//!
//! User and host names come from workstations nobody at the server controls. Printed raw,
//! a name holding `ESC [ 2 J` clears the admin's screen, and one holding a bidi override
//! shows a table in another order than it is. The server stores such names escaped, and
//! every human-readable output escapes again; JSON needs nothing, serde escapes control
//! characters itself.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Longest agent id, instance id, platform and version string, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// Longest user name in a hello, in bytes.
pub const MAX_USER_BYTES: usize = 256;

/// Longest host name in a hello, in bytes (a DNS name is at most 253).
pub const MAX_HOST_BYTES: usize = 255;

/// Longest detail of an agent's update report, in bytes.
pub const MAX_DETAIL_BYTES: usize = 256;

/// `text` with every control character shown as an escape: C0 (newlines and tabs too, a
/// table cell is one line), DEL and C1 as `\x1b`, the Unicode bidi controls
/// (U+202A–U+202E, U+2066–U+2069) as `\u{202e}`. A backslash stays a backslash: the
/// output is for reading, not for parsing back.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !needs_escape(c) {
            out.push(c);
        } else if u32::from(c) <= 0xff {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        } else {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Whether `id` may name an agent or an instance: 1 to [`MAX_ID_BYTES`] of ASCII letters,
/// digits, `.`, `_` and `-`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `text` may stand for a platform or a version: 1 to [`MAX_ID_BYTES`] printable
/// ASCII characters without spaces.
pub fn is_valid_token(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_ID_BYTES && text.bytes().all(|b| b.is_ascii_graphic())
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(escape_control("\u{1b}[2Jalice"), "\\x1b[2Jalice");
        assert_eq!(escape_control("a\nb\tc\rd\0"), "a\\x0ab\\x09c\\x0dd\\x00");
        assert_eq!(escape_control("del\u{7f}"), "del\\x7f");
        assert_eq!(escape_control("csi\u{9b}31m"), "csi\\x9b31m");
        assert_eq!(
            escape_control("user\u{202e}gpj.exe"),
            "user\\u{202e}gpj.exe"
        );
        assert_eq!(escape_control("\u{2066}x\u{2069}"), "\\u{2066}x\\u{2069}");
    }

    #[test]
    fn ordinary_text_is_left_alone() {
        assert!(matches!(
            escape_control("ws-1 Zoë 東京 \\n"),
            Cow::Borrowed(_)
        ));
        assert_eq!(escape_control("1.2.0-beta+7"), "1.2.0-beta+7");
    }

    #[test]
    fn ids_and_tokens() {
        assert!(is_valid_id("5f0c2a9e-3b7d-4e61-9c28-7a1d4b6e0f93"));
        assert!(is_valid_id("ws_07.lab"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("\u{1b}[31m"));
        assert!(!is_valid_id(&"a".repeat(MAX_ID_BYTES + 1)));
        assert!(is_valid_token("linux-x86_64"));
        assert!(is_valid_token("1.2.0-beta+7"));
        assert!(!is_valid_token("1.2 .0"));
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("zoë", 3), "zo");
        assert_eq!(truncate("東京", 4), "東");
    }
}
