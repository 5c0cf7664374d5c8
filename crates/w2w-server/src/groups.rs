//! Named groups hosted by this relay: membership checked by the relay,
//! every change a signed [`GroupOp`] (see `w2w_proto::group`), the state and
//! the signed log kept in the store.
//!
//! Groups of other relays are reached through the core (PROTOCOL 12.14):
//! a client's request about one goes to `Federation::group_request`; the
//! core's questions about groups of this relay, and creates it cleared
//! with the federation, come back here ([`run`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use w2w_proto::frame::{RelayToClient, Response, ResponseBody};
use w2w_proto::group::{valid_name, GroupAction, GroupInfo, GroupOp, MAX_MEMBERS};
use w2w_proto::s2s::GroupQuery;
use w2w_proto::{Address, ErrorCode};

use crate::federation::GroupWork;
use crate::router::Outbox;
use crate::shared::Shared;
use crate::store::Write;

#[derive(Debug, Clone)]
struct Group {
    owner: Address,
    /// member → admin
    members: BTreeMap<Address, bool>,
    seq: u64,
}

/// Bounds on the group tables (see [`crate::config::Limits`]).
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    /// Groups this relay hosts.
    pub max_groups: usize,
    /// Groups one address may own.
    pub max_groups_per_owner: usize,
    /// Operations kept in each group's stored log (older ones are pruned).
    pub log_len: u64,
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
            seq: g.seq,
        }
    }

    pub fn get(&self, name: &str) -> Option<GroupInfo> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(name).map(|g| Self::info(name, g))
    }

    /// Whether this relay hosts group `name`.
    pub fn hosts(&self, name: &str) -> bool {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.contains_key(name)
    }

    /// The names of every group hosted here.
    pub fn names(&self) -> Vec<String> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.keys().cloned().collect()
    }

    /// The checks an operation passes before any group is looked at
    /// (PROTOCOL 8.1, checks 1–3): a valid name, the actor is `requester`
    /// (the address registered on the connection), its signature.
    pub fn check_signed(op: &GroupOp, requester: &Address) -> Result<(), ErrorCode> {
        if !valid_name(&op.name) {
            return Err(ErrorCode::Malformed);
        }
        if op.actor != *requester {
            return Err(ErrorCode::NotAllowed);
        }
        op.verify().map_err(|_| ErrorCode::BadSignature)
    }

    /// GROUP_INFO for `asker`: the state, shown to members only.
    pub fn info_for(&self, name: &str, asker: &Address) -> Result<GroupInfo, ErrorCode> {
        match self.get(name) {
            Some(g) if g.members.iter().any(|(m, _)| m == asker) => Ok(g),
            Some(_) => Err(ErrorCode::NotMember),
            None => Err(ErrorCode::UnknownGroup),
        }
    }

    /// Checks and applies `op` from the registered client `requester`;
    /// returns the new state and the store write that makes it durable.
    /// Rights are checked before the sequence, so only an operation that
    /// may change the group ever moves its counter (see `w2w_proto::group`).
    pub fn apply(
        &self,
        op: &GroupOp,
        requester: &Address,
        limits: &GroupLimits,
    ) -> Result<(GroupInfo, Write), ErrorCode> {
        Self::check_signed(op, requester)?;
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let next = match (&op.action, map.get(&op.name)) {
            (GroupAction::Create, Some(_)) => return Err(ErrorCode::GroupExists),
            (GroupAction::Create, None) => {
                if map.len() >= limits.max_groups {
                    return Err(ErrorCode::LimitReached);
                }
                let owned = map.values().filter(|g| g.owner == op.actor).count();
                if owned >= limits.max_groups_per_owner {
                    return Err(ErrorCode::LimitReached);
                }
                if op.seq != 1 {
                    return Err(ErrorCode::StaleSeq);
                }
                Group {
                    owner: op.actor,
                    members: BTreeMap::from([(op.actor, true)]),
                    seq: 1,
                }
            }
            (_, None) => return Err(ErrorCode::UnknownGroup),
            (action, Some(g)) => {
                let is_admin = g.members.get(&op.actor).copied().unwrap_or(false);
                let mut g = g.clone();
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
                        // owner stays. Removing a non-member changes nothing
                        // and is refused, so outsiders cannot touch the log.
                        if (!is_admin && *m != op.actor) || *m == g.owner {
                            return Err(ErrorCode::NotAllowed);
                        }
                        if g.members.remove(m).is_none() {
                            return Err(ErrorCode::NotMember);
                        }
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
                // Compare and set: exactly the next number, never a jump.
                if op.seq != g.seq.saturating_add(1) {
                    return Err(ErrorCode::StaleSeq);
                }
                g.seq = op.seq;
                g
            }
        };
        let info = Self::info(&op.name, &next);
        let write = Write::Group {
            op: Box::new(op.clone()),
            owner: next.owner,
            seq: next.seq,
            members: info.members.clone(),
            keep_log: limits.log_len,
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

/// Applies `op` here and answers `done` once the change is durable (or
/// with the refusal): a client's operation on a group of this relay, a
/// create cleared with the federation, or another relay's question.
/// A create that commits publishes the group's record.
fn apply_here(
    shared: &Arc<Shared>,
    op: GroupOp,
    done: impl FnOnce(Result<GroupInfo, ErrorCode>) + Send + 'static,
) {
    let applied = shared
        .groups
        .apply(&op, &op.actor, &shared.limits.group_limits());
    let (info, write) = match applied {
        Ok(x) => x,
        Err(code) => {
            shared.metrics.error(code);
            return done(Err(code));
        }
    };
    let s = shared.clone();
    shared.tracker.spawn(async move {
        match s.store.write(write).await {
            Ok(_) => {
                if matches!(op.action, GroupAction::Create) {
                    s.fed.host_group(&op.name, true);
                }
                done(Ok(info))
            }
            Err(_) => done(Err(ErrorCode::Internal)),
        }
    });
}

/// A client's operation on a group of this relay (or a create), answered
/// on its connection once durable.
pub fn apply_for_client(shared: &Arc<Shared>, outbox: Arc<Outbox>, req_id: u32, op: GroupOp) {
    let code = w2w_proto::frame::RequestOp::GROUP;
    apply_here(shared, op, move |result| {
        let result = result.map(ResponseBody::Group).map_err(|c| c.as_u16());
        let resp = RelayToClient::Response(Response {
            req_id,
            op: code,
            result,
        });
        let _ = outbox.try_enqueue(resp.encode());
    });
}

/// The group task: creates the core cleared with the federation, and other
/// relays' questions about the groups of this relay.
pub async fn run(shared: Arc<Shared>) {
    loop {
        let work = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            w = shared.fed.next_group_work() => w,
        };
        match work {
            GroupWork::Create { outbox, req_id, op } => {
                apply_for_client(&shared, outbox, req_id, op)
            }
            // Into debt if need be: the sender's next frames wait it off.
            GroupWork::Charge { address, bytes } => {
                let now = std::time::Instant::now();
                let budget = shared.senders.get(&address.0, now);
                let mut b = budget.lock().unwrap_or_else(|e| e.into_inner());
                b.bytes.charge_after(bytes, now);
            }
            GroupWork::Question(q) => {
                let (origin, nonce) = (q.origin, q.nonce);
                match q.query {
                    GroupQuery::Info { name, asker } => {
                        let r = shared.groups.info_for(&name, &asker);
                        shared.fed.group_reply(origin, nonce, &name, r);
                    }
                    GroupQuery::Op(op) => {
                        let (fed, name) = (shared.fed.clone(), op.name.clone());
                        // The actor is a client of `origin`, which checked
                        // that; its signature is checked here.
                        apply_here(&shared, op, move |r| {
                            fed.group_reply(origin, nonce, &name, r)
                        });
                    }
                    GroupQuery::Locate(_) => {} // answered by the core
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use w2w_proto::Identity;

    const LIMITS: GroupLimits = GroupLimits {
        max_groups: 4,
        max_groups_per_owner: 2,
        log_len: 100,
    };

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
        assert_eq!(
            g.apply(&op(&alice, GroupAction::Create, 7), &a, &LIMITS)
                .unwrap_err(),
            ErrorCode::StaleSeq,
            "a group starts at seq 1"
        );
        g.apply(&op(&alice, GroupAction::Create, 1), &a, &LIMITS)
            .unwrap();
        assert_eq!(
            g.apply(&op(&alice, GroupAction::Create, 1), &a, &LIMITS)
                .unwrap_err(),
            ErrorCode::GroupExists
        );
        let info = g
            .apply(&op(&alice, GroupAction::Add(bob.address()), 2), &a, &LIMITS)
            .unwrap()
            .0;
        assert_eq!(info.seq, 2);
        // Replayed op.
        assert_eq!(
            g.apply(&op(&alice, GroupAction::Add(bob.address()), 2), &a, &LIMITS)
                .unwrap_err(),
            ErrorCode::StaleSeq
        );
        // Bob is not an admin.
        assert_eq!(
            g.apply(
                &op(&bob, GroupAction::Add(carol.address()), 3),
                &bob.address(),
                &LIMITS
            )
            .unwrap_err(),
            ErrorCode::NotAllowed
        );
        // Someone else's signature presented by bob.
        assert_eq!(
            g.apply(
                &op(&alice, GroupAction::Add(carol.address()), 3),
                &bob.address(),
                &LIMITS
            )
            .unwrap_err(),
            ErrorCode::NotAllowed
        );
        let mut forged = op(&alice, GroupAction::Add(carol.address()), 3);
        forged.action = GroupAction::Add(bob.address());
        assert_eq!(
            g.apply(&forged, &a, &LIMITS).unwrap_err(),
            ErrorCode::BadSignature
        );
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
            g.apply(&op(&alice, GroupAction::Remove(a), 3), &a, &LIMITS)
                .unwrap_err(),
            ErrorCode::NotAllowed,
            "the owner stays"
        );
        assert_eq!(g.get("team").unwrap().seq, 2, "refusals move nothing");
    }

    /// The hardening finding: a non-member "removing itself" with seq
    /// 2^64-1 froze the group for everyone. Now it is refused before the
    /// sequence is looked at, and no operation can jump the counter.
    #[test]
    fn outsiders_cannot_freeze_or_exhaust_a_group() {
        let (alice, mallory) = (Identity::from_seed([1; 32]), Identity::from_seed([9; 32]));
        let g = Groups::default();
        let a = alice.address();
        let m = mallory.address();
        g.apply(
            &GroupOp::sign(&alice, "team", GroupAction::Create, 1),
            &a,
            &LIMITS,
        )
        .unwrap();
        for seq in [2, u64::MAX] {
            let leave = GroupOp::sign(&mallory, "team", GroupAction::Remove(m), seq);
            assert_eq!(
                g.apply(&leave, &m, &LIMITS).unwrap_err(),
                ErrorCode::NotMember
            );
        }
        let jump = GroupOp::sign(&alice, "team", GroupAction::Add(m), u64::MAX);
        assert_eq!(
            g.apply(&jump, &a, &LIMITS).unwrap_err(),
            ErrorCode::StaleSeq
        );
        assert_eq!(g.get("team").unwrap().seq, 1);
        // The owner's next operation still works.
        let add = GroupOp::sign(&alice, "team", GroupAction::Add(m), 2);
        assert_eq!(g.apply(&add, &a, &LIMITS).unwrap().0.seq, 2);
    }

    #[test]
    fn two_admins_racing_for_one_seq_one_wins_the_other_resigns() {
        let (alice, bob) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
        let (a, b) = (alice.address(), bob.address());
        let g = Groups::default();
        let op = |who: &Identity, action, seq| GroupOp::sign(who, "team", action, seq);
        g.apply(&op(&alice, GroupAction::Create, 1), &a, &LIMITS)
            .unwrap();
        g.apply(&op(&alice, GroupAction::Add(b), 2), &a, &LIMITS)
            .unwrap();
        g.apply(&op(&alice, GroupAction::Admin(b, true), 3), &a, &LIMITS)
            .unwrap();
        // Both read seq 3 and sign seq 4.
        let x = Address([7; 32]);
        let y = Address([8; 32]);
        g.apply(&op(&alice, GroupAction::Add(x), 4), &a, &LIMITS)
            .unwrap();
        assert_eq!(
            g.apply(&op(&bob, GroupAction::Add(y), 4), &b, &LIMITS)
                .unwrap_err(),
            ErrorCode::StaleSeq
        );
        let seq = g.get("team").unwrap().seq;
        g.apply(&op(&bob, GroupAction::Add(y), seq + 1), &b, &LIMITS)
            .unwrap();
        assert_eq!(g.get("team").unwrap().members.len(), 4);
    }

    #[test]
    fn group_tables_are_bounded() {
        let g = Groups::default();
        let create = |who: &Identity, name: &str| {
            g.apply(
                &GroupOp::sign(who, name, GroupAction::Create, 1),
                &who.address(),
                &LIMITS,
            )
        };
        let (a, b, c) = (
            Identity::from_seed([1; 32]),
            Identity::from_seed([2; 32]),
            Identity::from_seed([3; 32]),
        );
        create(&a, "a1").unwrap();
        create(&a, "a2").unwrap();
        assert_eq!(create(&a, "a3").unwrap_err(), ErrorCode::LimitReached);
        create(&b, "b1").unwrap();
        create(&b, "b2").unwrap();
        assert_eq!(create(&c, "c1").unwrap_err(), ErrorCode::LimitReached);
    }
}
