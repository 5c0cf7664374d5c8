//! Machine-readable codes. One numbering is shared by ERROR frames, receipt
//! reasons, c2s response statuses and WebSocket close codes: a fatal error
//! closes the connection with close code `4000 + code`, so a browser that
//! only sees the close event still learns the exact reason.

macro_rules! error_codes {
    ($( #[doc = $doc:literal] $name:ident = $num:literal, $slug:literal; )*) => {
        /// Every error a relay can report. The numeric value is on the wire.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ErrorCode {
            $( #[doc = $doc] $name = $num, )*
        }

        impl ErrorCode {
            /// All codes, in numeric order (for docs, metrics and tests).
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// Parses a wire value; unknown values stay unknown (`None`) so a
            /// newer relay's codes never break an older client.
            pub fn from_u16(v: u16) -> Option<ErrorCode> {
                match v {
                    $( $num => Some(ErrorCode::$name), )*
                    _ => None,
                }
            }

            /// The stable snake_case name used in logs, metrics labels, JSON
            /// and WebSocket close reasons.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => $slug, )*
                }
            }

            /// One sentence on what the code means (its doc comment).
            pub fn description(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => $doc.trim_ascii_start(), )*
                }
            }
        }
    };
}

error_codes! {
    /// The frame is truncated, has trailing bytes, or a field is out of range.
    Malformed = 1, "malformed";
    /// The frame type byte is not one this relay knows.
    UnknownFrameType = 2, "unknown_frame_type";
    /// The version byte is not a version this relay speaks.
    UnsupportedVersion = 3, "unsupported_version";
    /// A frame that needs a registered session arrived before sigC was accepted.
    NotRegistered = 4, "not_registered";
    /// A frame arrived out of order, after registration, or in the wrong direction.
    UnexpectedFrame = 5, "unexpected_frame";
    /// The route byte of a MSG frame is unknown.
    UnknownRoute = 6, "unknown_route";
    /// The c2s request op is unknown.
    UnknownOp = 7, "unknown_op";
    /// WebSocket text frames are not part of the protocol; frames are binary.
    TextFrame = 8, "text_frame";
    /// No REGISTER/CONFIRM within the auth timeout (default 10 s).
    AuthTimeout = 10, "auth_timeout";
    /// The sigA timestamp is outside the allowed clock skew (default ±60 s).
    StaleTimestamp = 11, "stale_timestamp";
    /// The transcript names a different relay key than this relay's.
    WrongRelay = 12, "wrong_relay";
    /// The client nonce was already used in an accepted registration.
    Replay = 13, "replay";
    /// sigA or sigC does not verify under the client's key.
    BadSignature = 14, "bad_signature";
    /// The transcript names a URL this relay does not serve.
    WrongUrl = 15, "wrong_url";
    /// The role byte is not one this endpoint accepts.
    WrongRole = 16, "wrong_role";
    /// The sender's rate limit (frames, or fan-out bytes) was exceeded; retry later.
    RateLimited = 20, "rate_limited";
    /// A WebSocket message exceeded the relay's max frame size.
    FrameTooLarge = 21, "frame_too_large";
    /// The connection's send queue exceeded its byte bound.
    SlowConsumer = 22, "slow_consumer";
    /// The relay is at its connection limit.
    MaxConnections = 23, "max_connections";
    /// An a2g list is longer than the relay's maximum.
    ListTooLong = 24, "list_too_long";
    /// The MSG `from` field is not the sender's registered address.
    SpoofedSender = 25, "spoofed_sender";
    /// Another session of this address asked to be its only one (EXCLUSIVE); this one is closed.
    Replaced = 26, "replaced";
    /// The relay is shutting down.
    ShuttingDown = 27, "shutting_down";
    /// An a2g list is empty.
    EmptyList = 28, "empty_list";
    /// No liveness reply (pong) within the ping timeout.
    PingTimeout = 29, "ping_timeout";
    /// The recipient is not connected to this relay (or reachable from it).
    NoRoute = 30, "no_route";
    /// The relay failed internally (storage error); the request may be retried.
    Internal = 31, "internal";
    /// A relay key not admitted for peering (allowlist mode).
    UnauthorizedPeer = 32, "unauthorized_peer";
    /// The directory knows the address, but no path reaches its relay.
    Unreachable = 33, "unreachable";
    /// The relay has its maximum number of peers; a REDIRECT names others.
    PeerLimit = 34, "peer_limit";
    /// A forwarded message exceeded the hop limit.
    HopLimit = 35, "hop_limit";
    /// A forwarded message would go back where it came from.
    Loop = 36, "loop";
    /// A presence record whose signatures do not verify.
    ForgedPresence = 37, "forged_presence";
    /// A second link to a relay that is already a peer.
    DuplicatePeer = 38, "duplicate_peer";
    /// A remote relay's receipt did not arrive in time.
    Timeout = 39, "timeout";
    /// A forwarded message already seen (dropped, not delivered twice).
    Duplicate = 40, "duplicate";
    /// The recipient's store-and-forward queue is at its quota.
    QueueFull = 41, "queue_full";
    /// No group by that name on this relay.
    UnknownGroup = 42, "unknown_group";
    /// The sender is not a member of the group.
    NotMember = 43, "not_member";
    /// The group operation needs a right the actor lacks (admin or owner).
    NotAllowed = 44, "not_allowed";
    /// A group by that name already exists.
    GroupExists = 45, "group_exists";
    /// The group operation's seq is not the group's current seq + 1: read the group again and sign anew.
    StaleSeq = 46, "stale_seq";
    /// The relay's store is momentarily saturated; nothing was accepted: retry after a short wait.
    StoreBusy = 47, "store_busy";
    /// A storage budget (the relay's, the sender's or the recipient's bytes on disk) is used up.
    StorageFull = 48, "storage_full";
    /// A table the request would grow is at its configured bound (groups, connections per IP).
    LimitReached = 49, "limit_reached";
    /// A peer's FORWARD contradicts the message it carries (recipients the header does not name, or a sender hosted here).
    ForgedForward = 50, "forged_forward";
    /// The address already holds the most sessions this relay allows (`--max-sessions`); close one, or ask for an exclusive session.
    TooManySessions = 51, "too_many_sessions";
    /// The recipient registered at another relay since the sender's relay looked it up: that relay looks it up again (a receipt shows it only if that finds nothing better).
    Moved = 52, "moved";
    /// The relay has just started and has not linked to any of its configured peers yet, so it cannot tell where the recipient is: retry in a few seconds.
    Joining = 53, "joining";
}

impl ErrorCode {
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The WebSocket close code used when this error ends a connection.
    pub fn close_code(self) -> u16 {
        4000 + self as u16
    }

    /// Inverse of [`ErrorCode::close_code`].
    pub fn from_close_code(code: u16) -> Option<ErrorCode> {
        code.checked_sub(4000).and_then(ErrorCode::from_u16)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.as_str(), *self as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_u16()));
            assert_eq!(ErrorCode::from_u16(c.as_u16()), Some(*c));
            assert_eq!(ErrorCode::from_close_code(c.close_code()), Some(*c));
            assert!((4000..5000).contains(&c.close_code()));
        }
        assert_eq!(ErrorCode::from_u16(9999), None);
    }
}
