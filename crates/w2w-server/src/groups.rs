//! Named groups hosted by this relay: membership checked by the relay,
//! every change a signed [`GroupOp`] (see `w2w_proto::group`), the state and
//! the signed log kept in the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use w2w_proto::group::{valid_name, GroupAction, GroupInfo, GroupOp, MAX_MEMBERS};
use w2w_proto::{Address, ErrorCode};

use crate::store::Write;

#[derive(Debug, Clone)]
struct Group {
    owner: Address,
    /// member → admin
    members: BTreeMap<Address, bool>,
    seq: u64,
}

/// All groups of this relay, in memory (loaded from the store at start).
#[derive(Default)]
pub struct Groups {
    map: RwLock<HashMap<String, Group>>,
}

impl Groups {
    /// Restores groups from stored rows: (name, owner, seq, members).
    pub fn load(rows: Vec<crate::store::GroupRow>) -> Self {
        let map = rows
            .into_iter()
            .map(|(name, owner, seq, members)| {
                (
                    name,
                    Group {
                        owner,
                        members: members.into_iter().collect(),
                        seq,
                    },
                )
            })
            .collect();
        Groups {
            map: RwLock::new(map),
        }
    }

    fn info(name: &str, g: &Group) -> GroupInfo {
        GroupInfo {
            name: name.to_owned(),
            owner: g.owner,
            members: g.members.iter().map(|(a, admin)| (*a, *admin)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<GroupInfo> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(name).map(|g| Self::info(name, g))
    }

    /// Checks and applies `op` from the registered client `requester`;
    /// returns the new state and the store write that makes it durable.
    pub fn apply(
        &self,
        op: &GroupOp,
        requester: &Address,
    ) -> Result<(GroupInfo, Write), ErrorCode> {
        if !valid_name(&op.name) {
            return Err(ErrorCode::Malformed);
        }
        if op.actor != *requester {
            return Err(ErrorCode::NotAllowed);
        }
        op.verify().map_err(|_| ErrorCode::BadSignature)?;
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let next = match (&op.action, map.get(&op.name)) {
            (GroupAction::Create, Some(_)) => return Err(ErrorCode::GroupExists),
            (GroupAction::Create, None) => Group {
                owner: op.actor,
                members: BTreeMap::from([(op.actor, true)]),
                seq: op.seq,
            },
            (_, None) => return Err(ErrorCode::UnknownGroup),
            (action, Some(g)) => {
                if op.seq <= g.seq {
                    return Err(ErrorCode::Replay);
                }
                let is_admin = g.members.get(&op.actor).copied().unwrap_or(false);
                let mut g = g.clone();
                g.seq = op.seq;
                match action {
                    GroupAction::Create => unreachable!("matched above"),
                    GroupAction::Add(m) => {
                        if !is_admin {
                            return Err(ErrorCode::NotAllowed);
                        }
                        if !g.members.contains_key(m) && g.members.len() >= MAX_MEMBERS {
                            return Err(ErrorCode::ListTooLong);
                        }
                        g.members.entry(*m).or_insert(false);
                    }
                    GroupAction::Remove(m) => {
                        // Members may leave; admins may remove others; the
                        // owner stays.
                        if (!is_admin && *m != op.actor) || *m == g.owner {
                            return Err(ErrorCode::NotAllowed);
                        }
                        g.members.remove(m);
                    }
                    GroupAction::Admin(m, on) => {
                        if op.actor != g.owner || *m == g.owner {
                            return Err(ErrorCode::NotAllowed);
                        }
                        match g.members.get_mut(m) {
                            Some(a) => *a = *on,
                            None => return Err(ErrorCode::NotMember),
                        }
                    }
                }
                g
            }
        };
        let info = Self::info(&op.name, &next);
        let write = Write::Group {
            op: Box::new(op.clone()),
            owner: next.owner,
            seq: next.seq,
            members: info.members.clone(),
        };
        map.insert(op.name.clone(), next);
        Ok((info, write))
    }

    /// Who a message from `sender` to group `name` goes to: every member
    /// but the sender. Only members may send.
    pub fn recipients(&self, name: &str, sender: &Address) -> Result<Vec<Address>, ErrorCode> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let g = map.get(name).ok_or(ErrorCode::UnknownGroup)?;
        if !g.members.contains_key(sender) {
            return Err(ErrorCode::NotMember);
        }
        Ok(g.members.keys().filter(|m| *m != sender).copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use w2w_proto::Identity;

    #[test]
    fn rules() {
        let (alice, bob, carol) = (
            Identity::from_seed([1; 32]),
            Identity::from_seed([2; 32]),
            Identity::from_seed([3; 32]),
        );
        let g = Groups::default();
        let a = alice.address();
        let op = |who: &Identity, action, seq| GroupOp::sign(who, "team", action, seq);
        g.apply(&op(&alice, GroupAction::Create, 1), &a).unwrap();
        assert_eq!(
            g.apply(&op(&alice, GroupAction::Create, 2), &a)
                .unwrap_err(),
            ErrorCode::GroupExists
        );
        g.apply(&op(&alice, GroupAction::Add(bob.address()), 2), &a)
            .unwrap();
        // Replayed op.
        assert_eq!(
            g.apply(&op(&alice, GroupAction::Add(bob.address()), 2), &a)
                .unwrap_err(),
            ErrorCode::Replay
        );
        // Bob is not an admin.
        assert_eq!(
            g.apply(
                &op(&bob, GroupAction::Add(carol.address()), 3),
                &bob.address()
            )
            .unwrap_err(),
            ErrorCode::NotAllowed
        );
        // Someone else's signature presented by bob.
        assert_eq!(
            g.apply(
                &op(&alice, GroupAction::Add(carol.address()), 4),
                &bob.address()
            )
            .unwrap_err(),
            ErrorCode::NotAllowed
        );
        let mut forged = op(&alice, GroupAction::Add(carol.address()), 5);
        forged.action = GroupAction::Add(bob.address());
        assert_eq!(g.apply(&forged, &a).unwrap_err(), ErrorCode::BadSignature);
        assert_eq!(g.recipients("team", &a).unwrap(), vec![bob.address()]);
        assert_eq!(
            g.recipients("team", &carol.address()).unwrap_err(),
            ErrorCode::NotMember
        );
        assert_eq!(
            g.recipients("nope", &a).unwrap_err(),
            ErrorCode::UnknownGroup
        );
        assert_eq!(
            g.apply(&op(&alice, GroupAction::Remove(a), 6), &a)
                .unwrap_err(),
            ErrorCode::NotAllowed,
            "the owner stays"
        );
    }
}
