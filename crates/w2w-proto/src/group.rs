//! Named groups: the seed's "a2g with a group name, like a Slack channel",
//! where the relay verifies membership instead of trusting a list.
//!
//! A group lives on the relay where it was created and is named there
//! (1–64 bytes of `a-z 0-9 . _ -`). Every membership change is a
//! [`GroupOp`] signed by the member making it, so the log of changes can be
//! checked by anyone holding it:
//!
//! ```text
//! sig = Sign(actor, GROUP_DOMAIN || u8 len || name || action || seq(u64 BE))
//! action = 1 create | 2 add(addr) | 3 remove(addr) | 4 admin(addr, on u8)
//! ```
//!
//! Rules (enforced by the relay): `create` makes the actor the owner (an
//! admin); `add` and `remove` need an admin (any member may remove itself);
//! `admin` needs the owner; the owner cannot be removed. A group's `seq`
//! counts its accepted operations: `create` has seq 1 and every later
//! operation must carry exactly the group's current seq + 1 (compare and
//! set). So a captured operation cannot be applied twice, the log has no
//! gaps, clocks play no part, and nobody can jump the counter to its end.
//! Two operations racing for the same seq: one wins, the other is refused
//! `stale_seq` and is signed again over the new state (the Rust client does
//! this itself).

use bytes::{BufMut, BytesMut};

use crate::frame::{put_string, DecodeError, Reader};
use crate::identity::{Address, Identity, SignatureError};

pub const GROUP_DOMAIN: &[u8] = b"w2w/v1 group\0";
pub const MAX_NAME: usize = 64;
/// Most members a group may have (bounds every answer and fan-out; every
/// member but the sender must fit in one sealed payload).
pub const MAX_MEMBERS: usize = crate::seal::MAX_RECIPIENTS + 1;

/// Whether `name` is a valid group name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// What a group operation does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupAction {
    Create,
    Add(Address),
    Remove(Address),
    Admin(Address, bool),
}

/// A signed membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOp {
    pub name: String,
    pub action: GroupAction,
    pub seq: u64,
    pub actor: Address,
    pub sig: [u8; 64],
}

impl GroupAction {
    /// The action's bytes as signed and sent: kind, then target and flag.
    pub fn to_bytes(&self) -> Vec<u8> {
        action_bytes(self)
    }
}

fn action_bytes(a: &GroupAction) -> Vec<u8> {
    match a {
        GroupAction::Create => vec![1],
        GroupAction::Add(x) => [&[2u8][..], &x.0].concat(),
        GroupAction::Remove(x) => [&[3u8][..], &x.0].concat(),
        GroupAction::Admin(x, on) => [&[4u8][..], &x.0, &[*on as u8]].concat(),
    }
}

impl GroupOp {
    fn signed_bytes(name: &str, action: &GroupAction, seq: u64) -> Vec<u8> {
        let mut m = Vec::with_capacity(GROUP_DOMAIN.len() + 1 + name.len() + 34 + 8);
        m.extend_from_slice(GROUP_DOMAIN);
        m.push(name.len() as u8);
        m.extend_from_slice(name.as_bytes());
        m.extend_from_slice(&action_bytes(action));
        m.extend_from_slice(&seq.to_be_bytes());
        m
    }

    pub fn sign(actor: &Identity, name: &str, action: GroupAction, seq: u64) -> Self {
        let sig = actor.sign(&Self::signed_bytes(name, &action, seq));
        GroupOp {
            name: name.to_owned(),
            action,
            seq,
            actor: actor.address(),
            sig,
        }
    }

    pub fn verify(&self) -> Result<(), SignatureError> {
        self.actor.verify(
            &Self::signed_bytes(&self.name, &self.action, self.seq),
            &self.sig,
        )
    }

    pub(crate) fn write(&self, b: &mut BytesMut) {
        put_string(b, &self.name, MAX_NAME);
        b.put_slice(&action_bytes(&self.action));
        b.put_u64(self.seq);
        b.put_slice(&self.actor.0);
        b.put_slice(&self.sig);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let name = r.string("group name", MAX_NAME)?;
        let action = match r.u8("group action")? {
            1 => GroupAction::Create,
            2 => GroupAction::Add(r.address("member")?),
            3 => GroupAction::Remove(r.address("member")?),
            4 => GroupAction::Admin(r.address("member")?, crate::frame::flag(r, "admin")?),
            v => {
                return Err(DecodeError::BadValue {
                    field: "group action",
                    value: v as u32,
                })
            }
        };
        Ok(GroupOp {
            name,
            action,
            seq: r.u64("seq")?,
            actor: r.address("actor")?,
            sig: r.array("sig")?,
        })
    }
}

/// A group as the relay reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    pub owner: Address,
    /// (member, is admin), in address order.
    pub members: Vec<(Address, bool)>,
    /// Operations applied so far: the next operation must carry `seq + 1`.
    pub seq: u64,
}

impl GroupInfo {
    pub(crate) fn write(&self, b: &mut BytesMut) {
        put_string(b, &self.name, MAX_NAME);
        b.put_slice(&self.owner.0);
        let n = self.members.len().min(MAX_MEMBERS);
        b.put_u16(n as u16);
        for (m, admin) in &self.members[..n] {
            b.put_slice(&m.0);
            b.put_u8(*admin as u8);
        }
        b.put_u64(self.seq);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let name = r.string("group name", MAX_NAME)?;
        let owner = r.address("owner")?;
        let n = r.u16("members")? as usize;
        if n > MAX_MEMBERS || r.remaining() < n * 33 {
            return Err(DecodeError::Truncated {
                field: "members",
                need: n * 33,
                have: r.remaining(),
            });
        }
        let mut members = Vec::with_capacity(n);
        for _ in 0..n {
            members.push((r.address("member")?, crate::frame::flag(r, "admin")?));
        }
        Ok(GroupInfo {
            name,
            owner,
            members,
            seq: r.u64("seq")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{ClientToRelay, Request, RequestOp};

    #[test]
    fn ops_sign_verify_and_round_trip() {
        let alice = Identity::from_seed([1; 32]);
        let bob = Identity::from_seed([2; 32]).address();
        for action in [
            GroupAction::Create,
            GroupAction::Add(bob),
            GroupAction::Remove(bob),
            GroupAction::Admin(bob, true),
        ] {
            let op = GroupOp::sign(&alice, "team", action, 7);
            assert!(op.verify().is_ok());
            let f = ClientToRelay::Request(Request {
                req_id: 1,
                op: RequestOp::Group(op.clone()),
            });
            assert_eq!(ClientToRelay::decode(&f.encode()).unwrap(), f);
            let mut forged = op.clone();
            forged.seq = 8;
            assert!(forged.verify().is_err());
        }
        assert!(valid_name("team-1.x_y"));
        assert!(!valid_name("Team"));
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(65)));
    }
}
