//! What one step of the datapath decided. Out-of-line BPF functions return
//! a single register, so the decision is one `u32`, but typed: a step either
//! lets the packet go on to the next step, ends it with a verdict that is
//! already counted, or drops it for a reason the caller counts (against the
//! endpoint it knows).
use aya_ebpf::bindings::xdp_action;
use plink_common::DropReason;

use crate::stats;

/// A step's decision (see the module documentation).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct Step(u32);

/// Drop reasons are stored above the XDP verdicts (0..=4).
const DROP_BASE: u32 = 0x100;

impl Step {
    /// Go on with the next step.
    pub const NEXT: Step = Step(u32::MAX);

    /// The packet's final verdict, counted already (a redirect, an answer,
    /// or a drop counted by the step itself).
    #[inline(always)]
    pub const fn verdict(action: u32) -> Step {
        Step(action)
    }

    /// Drop for `reason`; counted by [`Step::finish`].
    #[inline(always)]
    pub const fn drop(reason: DropReason) -> Step {
        Step(DROP_BASE + reason as u32)
    }

    /// A step-specific outcome other than the three above (e.g. a lost
    /// insertion race), `code` below [`Step::NEXT`] and above every drop.
    #[inline(always)]
    pub const fn other(code: u32) -> Step {
        Step(DROP_BASE + 0x1000 + code)
    }

    /// The code of a [`Step::other`], if this is one.
    #[inline(always)]
    pub fn other_code(self) -> Option<u32> {
        (self.0 >= DROP_BASE + 0x1000 && self.0 != u32::MAX).then(|| self.0 - DROP_BASE - 0x1000)
    }

    #[inline(always)]
    pub fn is_next(self) -> bool {
        self.0 == u32::MAX
    }

    /// The drop reason, if this is a drop not yet counted.
    #[inline(always)]
    pub fn reason(self) -> Option<DropReason> {
        self.0
            .checked_sub(DROP_BASE)
            .and_then(DropReason::from_index)
    }

    /// Ends the packet: counts a drop against `endpoint_id` and returns
    /// XDP_DROP, or returns the verdict. `NEXT` here is a bug in the caller;
    /// it is aborted (and counted by the interface's verdict counters).
    #[inline(always)]
    pub fn finish(self, endpoint_id: u32) -> u32 {
        if let Some(r) = self.reason() {
            return stats::drop(r, endpoint_id);
        }
        if self.0 <= xdp_action::XDP_REDIRECT {
            return self.0;
        }
        xdp_action::XDP_ABORTED
    }
}

/// Runs a step: on anything but [`Step::NEXT`] the packet ends there,
/// counted against the endpoint given (or `NO_EP`).
macro_rules! step {
    ($e:expr, $endpoint_id:expr) => {{
        let s: $crate::step::Step = $e;
        if !s.is_next() {
            return s.finish($endpoint_id);
        }
    }};
}
pub(crate) use step;
