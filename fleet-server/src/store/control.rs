//! Commands queued for devices.

use serde::Serialize;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{Command, CommandKind, CommandStatus};

use super::{StoreError, UnixMillis};

/// Longest time-to-live of a command: 30 days, in seconds.
pub const COMMAND_TTL_MAX_S: u32 = 30 * 24 * 3_600;
/// Most commands a device may have open (neither answered nor expired).
pub const OPEN_COMMANDS_MAX: usize = 64;

/// Where a command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Queued, not yet published.
    Pending,
    /// Published at least once, not answered yet.
    Delivered,
    /// Answered by the device (see the result).
    Done,
    /// Its time-to-live ran out before an answer (or the device said so).
    Expired,
}

impl CommandState {
    /// The stored name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CommandState::Pending => "pending",
            CommandState::Delivered => "delivered",
            CommandState::Done => "done",
            CommandState::Expired => "expired",
        }
    }

    /// Parses a stored name.
    pub(crate) fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "pending" => Ok(CommandState::Pending),
            "delivered" => Ok(CommandState::Delivered),
            "done" => Ok(CommandState::Done),
            "expired" => Ok(CommandState::Expired),
            other => Err(StoreError::corrupt(format!("unknown command state {other:?}"))),
        }
    }

    /// Whether the command still waits for an answer.
    pub fn is_open(self) -> bool {
        matches!(self, CommandState::Pending | CommandState::Delivered)
    }
}

/// A stored command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandRecord {
    /// Server-assigned id, unique across the fleet, echoed by the device.
    pub id: u32,
    /// The device it is for.
    pub device_id: DeviceId,
    /// What to do.
    pub kind: CommandKind,
    /// Time-to-live it was queued with.
    pub ttl_s: u32,
    /// When it was queued.
    pub created_at_ms: UnixMillis,
    /// When it stops being valid.
    pub expires_at_ms: UnixMillis,
    /// Where it stands, as of the read (an open command past its expiry
    /// reads as [`CommandState::Expired`]).
    pub state: CommandState,
    /// When it was last published.
    pub delivered_at_ms: Option<UnixMillis>,
    /// How many times it was published.
    pub deliveries: u32,
    /// The device's answer.
    pub result: Option<CommandStatus>,
    /// When the answer arrived.
    pub completed_at_ms: Option<UnixMillis>,
}

impl CommandRecord {
    /// The message to publish at `now_ms`, with the time-to-live left
    /// (rounded up), or `None` if it is no longer open or has expired.
    pub fn to_message(&self, now_ms: UnixMillis) -> Option<Command> {
        if !self.state.is_open() || now_ms >= self.expires_at_ms {
            return None;
        }
        let left_ms = self.expires_at_ms - now_ms;
        let ttl_s = u32::try_from((left_ms + 999) / 1_000).unwrap_or(u32::MAX);
        Some(Command { id: self.id, ttl_s, kind: self.kind })
    }
}

/// Checks a time-to-live.
pub(crate) fn check_ttl(ttl_s: u32) -> Result<(), StoreError> {
    if (1..=COMMAND_TTL_MAX_S).contains(&ttl_s) {
        Ok(())
    } else {
        Err(StoreError::invalid(format!("command ttl must be 1..={COMMAND_TTL_MAX_S} seconds")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: CommandState) -> CommandRecord {
        CommandRecord {
            id: 7,
            device_id: DeviceId::new("d").unwrap(),
            kind: CommandKind::Reboot,
            ttl_s: 60,
            created_at_ms: 0,
            expires_at_ms: 60_000,
            state,
            delivered_at_ms: None,
            deliveries: 0,
            result: None,
            completed_at_ms: None,
        }
    }

    #[test]
    fn message_carries_the_ttl_left() {
        let cmd = record(CommandState::Pending);
        assert_eq!(cmd.to_message(0).unwrap().ttl_s, 60);
        assert_eq!(cmd.to_message(30_500).unwrap().ttl_s, 30);
        assert_eq!(cmd.to_message(59_999).unwrap().ttl_s, 1);
        assert!(cmd.to_message(60_000).is_none());
        assert!(record(CommandState::Done).to_message(0).is_none());
    }

    #[test]
    fn states_round_trip() {
        for state in
            [CommandState::Pending, CommandState::Delivered, CommandState::Done, CommandState::Expired]
        {
            assert_eq!(CommandState::parse(state.as_str()).unwrap(), state);
        }
        assert!(check_ttl(0).is_err());
        assert!(check_ttl(COMMAND_TTL_MAX_S + 1).is_err());
    }
}
