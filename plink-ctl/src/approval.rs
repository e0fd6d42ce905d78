//! The endpoint approval state machine of SPEC §4, as pure functions.
//!
//! | from       | event                                   | to         |
//! |------------|-----------------------------------------|------------|
//! | (new)      | tenant outside `visibility`             | `rejected` (not visible) |
//! | (new)      | tenant visible, in `auto_approve`       | `approved` |
//! | (new)      | tenant visible, not auto-approved       | `pending`  |
//! | `pending`  | approve / reject                        | `approved` / `rejected` |
//! | `approved` | reject                                  | `rejected` |
//! | `rejected` | approve (tenant visible)                | `approved` |
//! | any        | remove                                  | `removed` (terminal) |
//! | `approved` | reload narrows `visibility` past tenant | `rejected` |
//!
//! Choices where the table is silent (documented in docs/CONFIG.md):
//! - Repeating the current decision (approve an approved endpoint, reject a
//!   rejected one, remove a removed one) is accepted and changes nothing, so
//!   scripts can be re-run.
//! - A `pending` endpoint whose tenant a reload makes invisible becomes
//!   `rejected` (not visible), like a new endpoint of an invisible tenant:
//!   it could never be approved as it stands.
//! - Widening `visibility` or `auto_approve` on reload changes no existing
//!   decision; an admin approves.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::Service;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    Pending,
    Approved,
    Rejected,
    Removed,
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectionState::Pending => "pending",
            ConnectionState::Approved => "approved",
            ConnectionState::Rejected => "rejected",
            ConnectionState::Removed => "removed",
        })
    }
}

/// Why an endpoint is in its state; shown by `endpoints list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The tenant is not in the service's visibility list.
    NotVisible,
    /// The tenant is in the service's auto-approval list.
    AutoApproved,
    /// Visible, waiting for an admin.
    AwaitingApproval,
    ApprovedByAdmin,
    RejectedByAdmin,
    RemovedByAdmin,
    /// A reload took the tenant out of the service's visibility list.
    VisibilityNarrowed,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::NotVisible => "tenant not visible",
            Reason::AutoApproved => "auto-approved",
            Reason::AwaitingApproval => "awaiting approval",
            Reason::ApprovedByAdmin => "approved by admin",
            Reason::RejectedByAdmin => "rejected by admin",
            Reason::RemovedByAdmin => "removed by admin",
            Reason::VisibilityNarrowed => "visibility narrowed on reload",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub state: ConnectionState,
    pub reason: Reason,
}

impl Decision {
    pub const fn new(state: ConnectionState, reason: Reason) -> Self {
        Self { state, reason }
    }
}

/// What a service grants one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub tenant: String,
    pub service: String,
    pub visible: bool,
    pub auto_approved: bool,
}

impl Access {
    pub fn of(service: &Service, tenant: &str) -> Self {
        let listed = |list: &[String]| list.iter().any(|t| t == "*" || t == tenant);
        let visible = listed(&service.visibility);
        Self {
            tenant: tenant.to_owned(),
            service: service.name.clone(),
            visible,
            auto_approved: visible && listed(&service.auto_approve),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Approve,
    Reject,
    Remove,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Approve => "approve",
            Action::Reject => "reject",
            Action::Remove => "remove",
        })
    }
}

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "tenant {tenant:?} is not in the visibility list of service {service:?}; add it to the service's `visibility` in the config, reload, then approve"
    )]
    NotVisible { tenant: String, service: String },
    #[error(
        "the endpoint was removed, which is final for its identity (name, network, address, service); to offer it again, delete it from the config and reload, then add it back (it starts over from its initial state)"
    )]
    Removed,
}

/// The state of an endpoint seen for the first time.
pub fn initial(access: &Access) -> Decision {
    if !access.visible {
        Decision::new(ConnectionState::Rejected, Reason::NotVisible)
    } else if access.auto_approved {
        Decision::new(ConnectionState::Approved, Reason::AutoApproved)
    } else {
        Decision::new(ConnectionState::Pending, Reason::AwaitingApproval)
    }
}

/// An admin action. `Ok(None)` means accepted with nothing to change.
pub fn apply(
    current: Decision,
    action: Action,
    access: &Access,
) -> Result<Option<Decision>, Refusal> {
    use ConnectionState::*;
    let next = match (current.state, action) {
        (Removed, Action::Remove) => return Ok(None),
        (Removed, _) => return Err(Refusal::Removed),
        (_, Action::Remove) => Decision::new(Removed, Reason::RemovedByAdmin),
        (Approved, Action::Approve) | (Rejected, Action::Reject) => return Ok(None),
        (Pending | Rejected, Action::Approve) => {
            if !access.visible {
                return Err(Refusal::NotVisible {
                    tenant: access.tenant.clone(),
                    service: access.service.clone(),
                });
            }
            Decision::new(Approved, Reason::ApprovedByAdmin)
        }
        (Pending | Approved, Action::Reject) => Decision::new(Rejected, Reason::RejectedByAdmin),
    };
    Ok(Some(next))
}

/// Re-evaluates a kept decision against a reloaded service.
pub fn on_reload(current: Decision, access: &Access) -> Decision {
    use ConnectionState::*;
    match current.state {
        Approved if !access.visible => Decision::new(Rejected, Reason::VisibilityNarrowed),
        Pending if !access.visible => Decision::new(Rejected, Reason::NotVisible),
        _ => current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConnectionState::*;

    fn access(visible: bool, auto_approved: bool) -> Access {
        Access {
            tenant: "tenant-a".into(),
            service: "orders".into(),
            visible,
            auto_approved,
        }
    }

    fn d(state: ConnectionState, reason: Reason) -> Decision {
        Decision::new(state, reason)
    }

    #[test]
    fn access_from_visibility_lists() {
        let mut s: Service = serde_yaml::from_str(
            "{name: orders, protocol: tcp, ports: [{port: 80}], backends: [{address: 198.51.100.10}], \
             nat: {addresses: [198.51.100.200]}, visibility: [tenant-a, tenant-b], auto_approve: [tenant-a]}",
        )
        .expect("service");
        assert_eq!(
            (
                Access::of(&s, "tenant-a").visible,
                Access::of(&s, "tenant-a").auto_approved
            ),
            (true, true)
        );
        assert_eq!(
            (
                Access::of(&s, "tenant-b").visible,
                Access::of(&s, "tenant-b").auto_approved
            ),
            (true, false)
        );
        assert_eq!(
            (
                Access::of(&s, "tenant-c").visible,
                Access::of(&s, "tenant-c").auto_approved
            ),
            (false, false)
        );
        s.visibility = vec!["*".into()];
        s.auto_approve = vec!["*".into()];
        assert_eq!(
            (
                Access::of(&s, "tenant-z").visible,
                Access::of(&s, "tenant-z").auto_approved
            ),
            (true, true)
        );
        // Auto-approval never reaches past visibility.
        s.visibility = vec!["tenant-a".into()];
        assert!(!Access::of(&s, "tenant-z").auto_approved);
    }

    #[test]
    fn row_new_not_visible_is_rejected() {
        assert_eq!(
            initial(&access(false, false)),
            d(Rejected, Reason::NotVisible)
        );
    }

    #[test]
    fn row_new_not_visible_cannot_be_approved() {
        let err = apply(
            initial(&access(false, false)),
            Action::Approve,
            &access(false, false),
        )
        .unwrap_err();
        assert_eq!(
            err,
            Refusal::NotVisible {
                tenant: "tenant-a".into(),
                service: "orders".into()
            }
        );
        assert!(err.to_string().contains("not in the visibility list"));
    }

    #[test]
    fn row_new_visible_auto_approved_is_approved() {
        assert_eq!(
            initial(&access(true, true)),
            d(Approved, Reason::AutoApproved)
        );
    }

    #[test]
    fn row_new_visible_not_auto_approved_is_pending() {
        assert_eq!(
            initial(&access(true, false)),
            d(Pending, Reason::AwaitingApproval)
        );
    }

    #[test]
    fn row_pending_approve_and_reject() {
        let p = d(Pending, Reason::AwaitingApproval);
        let a = access(true, false);
        assert_eq!(
            apply(p, Action::Approve, &a),
            Ok(Some(d(Approved, Reason::ApprovedByAdmin)))
        );
        assert_eq!(
            apply(p, Action::Reject, &a),
            Ok(Some(d(Rejected, Reason::RejectedByAdmin)))
        );
    }

    #[test]
    fn row_approved_reject() {
        let a = access(true, true);
        assert_eq!(
            apply(d(Approved, Reason::AutoApproved), Action::Reject, &a),
            Ok(Some(d(Rejected, Reason::RejectedByAdmin)))
        );
    }

    #[test]
    fn row_rejected_approve_needs_visibility() {
        let r = d(Rejected, Reason::RejectedByAdmin);
        assert_eq!(
            apply(r, Action::Approve, &access(true, false)),
            Ok(Some(d(Approved, Reason::ApprovedByAdmin)))
        );
        assert!(matches!(
            apply(r, Action::Approve, &access(false, false)),
            Err(Refusal::NotVisible { .. })
        ));
    }

    #[test]
    fn row_any_remove_is_terminal() {
        let a = access(true, false);
        for from in [
            d(Pending, Reason::AwaitingApproval),
            d(Approved, Reason::AutoApproved),
            d(Rejected, Reason::NotVisible),
        ] {
            assert_eq!(
                apply(from, Action::Remove, &a),
                Ok(Some(d(Removed, Reason::RemovedByAdmin)))
            );
        }
        let removed = d(Removed, Reason::RemovedByAdmin);
        assert_eq!(apply(removed, Action::Approve, &a), Err(Refusal::Removed));
        assert_eq!(apply(removed, Action::Reject, &a), Err(Refusal::Removed));
        assert_eq!(apply(removed, Action::Remove, &a), Ok(None));
        // A reload never brings it back, whatever the lists say.
        assert_eq!(on_reload(removed, &access(true, true)), removed);
    }

    #[test]
    fn row_reload_narrowing_visibility_rejects_approved() {
        let approved = d(Approved, Reason::ApprovedByAdmin);
        assert_eq!(
            on_reload(approved, &access(false, false)),
            d(Rejected, Reason::VisibilityNarrowed)
        );
        // Still visible: the decision stands.
        assert_eq!(on_reload(approved, &access(true, false)), approved);
    }

    #[test]
    fn reload_keeps_other_decisions() {
        let pending = d(Pending, Reason::AwaitingApproval);
        assert_eq!(
            on_reload(pending, &access(true, true)),
            pending,
            "widening auto_approve decides nothing"
        );
        assert_eq!(
            on_reload(pending, &access(false, false)),
            d(Rejected, Reason::NotVisible)
        );
        let rejected = d(Rejected, Reason::NotVisible);
        assert_eq!(
            on_reload(rejected, &access(true, true)),
            rejected,
            "widening visibility decides nothing"
        );
    }

    #[test]
    fn repeating_a_decision_changes_nothing() {
        let a = access(true, false);
        assert_eq!(
            apply(d(Approved, Reason::ApprovedByAdmin), Action::Approve, &a),
            Ok(None)
        );
        assert_eq!(
            apply(d(Rejected, Reason::RejectedByAdmin), Action::Reject, &a),
            Ok(None)
        );
    }
}
