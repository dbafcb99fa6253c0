//! Protocol versions and the rule for who can talk to whom.
//!
//! The agent states the version it speaks in its first message. The server answers with
//! the version both will use: the agent's own, when it lies within the range the server
//! supports. Outside that range the server refuses with an
//! [`ErrorCode::UnsupportedProtocol`](crate::ErrorCode::UnsupportedProtocol) error that
//! carries the supported range, then closes with
//! [`CloseCode::UnsupportedProtocol`](crate::CloseCode::UnsupportedProtocol).
//! Nothing is ever dropped silently.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest protocol version this build still understands.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The newest protocol version this build understands.
pub const MAX_PROTOCOL_VERSION: u32 = PROTOCOL_VERSION;

/// An inclusive range of protocol versions, as sent in a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolRange {
    pub min: u32,
    pub max: u32,
}

impl ProtocolRange {
    /// The range this build supports.
    pub const SUPPORTED: ProtocolRange = ProtocolRange {
        min: MIN_PROTOCOL_VERSION,
        max: MAX_PROTOCOL_VERSION,
    };

    /// The version to speak with a peer that asked for `requested`, if any.
    pub fn negotiate(self, requested: u32) -> Option<u32> {
        (self.min..=self.max)
            .contains(&requested)
            .then_some(requested)
    }
}

impl std::fmt::Display for ProtocolRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{} to {}", self.min, self.max)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_accepts_only_the_supported_range() {
        let range = ProtocolRange { min: 2, max: 4 };
        assert_eq!(range.negotiate(1), None);
        assert_eq!(range.negotiate(2), Some(2));
        assert_eq!(range.negotiate(4), Some(4));
        assert_eq!(range.negotiate(5), None);
        assert_eq!(
            ProtocolRange::SUPPORTED.negotiate(PROTOCOL_VERSION),
            Some(PROTOCOL_VERSION)
        );
    }

    #[test]
    fn range_displays_for_humans() {
        assert_eq!(ProtocolRange { min: 1, max: 1 }.to_string(), "1");
        assert_eq!(ProtocolRange { min: 1, max: 3 }.to_string(), "1 to 3");
    }
}
