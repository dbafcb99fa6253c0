//! WebSocket close codes and what each means in this protocol.
//!
//! The 1000-range codes keep their RFC 6455 meaning; the 4000-range codes are ours. An agent
//! decides from the code whether to reconnect at once, back off, or tell its user.

/// Why a side closed the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the conversation is over (an admin command finished, an agent stopped).
    Normal,
    /// 1001: the server is shutting down; reconnect with backoff.
    GoingAway,
    /// 1002: a WebSocket protocol violation (bad framing).
    ProtocolError,
    /// 1003: a binary frame; this protocol is JSON text only.
    UnsupportedData,
    /// 1007: a text message that is not a valid message of this protocol.
    InvalidPayload,
    /// 1008: a valid message at the wrong moment (a second hello, a request before hello).
    PolicyViolation,
    /// 1009: a message or frame above the size limit.
    MessageTooBig,
    /// 1011: the server failed while handling the connection.
    InternalError,
    /// 4001: the peer speaks a protocol version outside the supported range.
    UnsupportedProtocol,
    /// 4002: no hello or login arrived in time after the WebSocket handshake.
    HelloTimeout,
    /// 4003: an admin request without a valid admin login, or a wrong password.
    Unauthorized,
    /// 4004: too many failed logins from this address; retry later.
    Throttled,
    /// 4005: the peer did not read its messages fast enough and was disconnected.
    SlowConsumer,
    /// 4006: nothing was heard from the peer for two heartbeat intervals.
    HeartbeatTimeout,
    /// 4007: the same agent connected again; this older connection is closed.
    Replaced,
    /// 4008: the server holds as many sessions as it is configured for.
    ServerFull,
    /// 4009: the server is updating: a forced logout at the deadline, or a connection
    /// refused until the new version is up. Reconnect within the announced window.
    ServerUpdating,
}

impl CloseCode {
    /// Every code, for documentation and tests.
    pub const ALL: [CloseCode; 17] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::UnsupportedData,
        CloseCode::InvalidPayload,
        CloseCode::PolicyViolation,
        CloseCode::MessageTooBig,
        CloseCode::InternalError,
        CloseCode::UnsupportedProtocol,
        CloseCode::HelloTimeout,
        CloseCode::Unauthorized,
        CloseCode::Throttled,
        CloseCode::SlowConsumer,
        CloseCode::HeartbeatTimeout,
        CloseCode::Replaced,
        CloseCode::ServerFull,
        CloseCode::ServerUpdating,
    ];

    /// The number sent in the close frame.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::UnsupportedData => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::MessageTooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::UnsupportedProtocol => 4001,
            CloseCode::HelloTimeout => 4002,
            CloseCode::Unauthorized => 4003,
            CloseCode::Throttled => 4004,
            CloseCode::SlowConsumer => 4005,
            CloseCode::HeartbeatTimeout => 4006,
            CloseCode::Replaced => 4007,
            CloseCode::ServerFull => 4008,
            CloseCode::ServerUpdating => 4009,
        }
    }

    /// The code for a number received in a close frame, if it is one of ours.
    pub fn from_code(code: u16) -> Option<CloseCode> {
        CloseCode::ALL
            .into_iter()
            .find(|known| known.code() == code)
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "going away",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::UnsupportedData => "unsupported data",
            CloseCode::InvalidPayload => "invalid payload",
            CloseCode::PolicyViolation => "policy violation",
            CloseCode::MessageTooBig => "message too big",
            CloseCode::InternalError => "internal error",
            CloseCode::UnsupportedProtocol => "unsupported protocol",
            CloseCode::HelloTimeout => "hello timeout",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Throttled => "throttled",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::Replaced => "replaced",
            CloseCode::ServerFull => "server full",
            CloseCode::ServerUpdating => "server updating",
        };
        write!(f, "{} ({name})", self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(code.code()), Some(code));
        }
        let mut numbers: Vec<u16> = CloseCode::ALL.iter().map(|code| code.code()).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), CloseCode::ALL.len());
        assert_eq!(CloseCode::from_code(4999), None);
    }
}
