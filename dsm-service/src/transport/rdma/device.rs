//! The verbs resources of a transport: opening the device (or saying
//! clearly why there is none), the protection domain and the completion
//! queue every queue pair shares, the queue-pair settings, the GID to route
//! with, work request ids and the names of completion errors.

use std::io;

use ibverbs::{CompletionQueue, Context, Gid, GidEntry, PreparedQueuePair, ProtectionDomain};

use super::{RECV_DEPTH, SEND_SLOTS};
use crate::transport::TransportError;
use crate::NodeId;

/// Environment variable that picks an RDMA device by name (`mlx5_0`, `rxe0`).
pub const DEVICE_ENV: &str = "FRAGVISOR_RDMA_DEVICE";

/// `IBV_GID_TYPE_ROCE_V2` (the crate does not re-export the constant).
const GID_TYPE_ROCE_V2: ibverbs::ibv_gid_type = 2;
/// Local ACK timeout exponent: 4.096 µs × 2^14 ≈ 67 ms per retry.
const QP_TIMEOUT: u8 = 14;
/// Transport retries before a send fails (the peer is declared gone).
const QP_RETRY: u8 = 7;
/// RNR retries; 7 means "forever", which credits make moot.
const QP_RNR_RETRY: u8 = 7;

/// The device context, protection domain and the completion queue shared by
/// every queue pair of a transport.
pub(super) struct Verbs {
    /// The device's name.
    pub(super) name: String,
    /// The GID table entry routed with, if any.
    pub(super) gid_index: Option<u32>,
    // Dropped by hand in this order, before `ctx`, which they borrow.
    cq: Option<CompletionQueue<'static>>,
    pd: Option<ProtectionDomain<'static>>,
    /// Leaked from a `Box` in [`Verbs::with_context`], freed in `drop`.
    ctx: &'static Context,
}

impl Verbs {
    /// Opens a device, or says clearly why there is none.
    pub(super) fn open(peers: usize) -> Result<Verbs, TransportError> {
        let list = ibverbs::devices().map_err(|e| {
            TransportError::Unavailable(format!(
                "no RDMA device found: listing RDMA devices failed ({e}); this host has no \
                 usable RDMA stack (kernel ib_uverbs and a verbs provider); use the TCP transport"
            ))
        })?;
        if list.is_empty() {
            return Err(TransportError::Unavailable(
                "no RDMA device found: the device list is empty; load an RDMA driver or create \
                 a SoftRoCE device (`rdma link add rxe0 type rxe netdev <interface>`), or use \
                 the TCP transport"
                    .into(),
            ));
        }
        let want = std::env::var(DEVICE_ENV).ok().filter(|s| !s.is_empty());
        let mut names = Vec::new();
        let mut problems = Vec::new();
        for dev in list.iter() {
            let name = dev
                .name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "<unnamed>".into());
            names.push(name.clone());
            if want.as_deref().is_some_and(|w| w != name) {
                continue;
            }
            match dev.open() {
                Ok(ctx) => return Verbs::with_context(ctx, name, peers),
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        Err(TransportError::Unavailable(match want {
            Some(w) if problems.is_empty() => format!(
                "no RDMA device named {w:?} (set by {DEVICE_ENV}); this host has {}",
                names.join(", ")
            ),
            _ => format!("no usable RDMA device: {}", problems.join("; ")),
        }))
    }

    fn with_context(ctx: Context, name: String, peers: usize) -> Result<Verbs, TransportError> {
        let gid_index = pick_gid(ctx.gid_table());
        let ctx: &'static Context = Box::leak(Box::new(ctx));
        // From here on `v`'s Drop frees the context, also on the error paths.
        let mut v = Verbs {
            name,
            gid_index,
            cq: None,
            pd: None,
            ctx,
        };
        let cqe = i32::try_from(peers.max(1) * (SEND_SLOTS + RECV_DEPTH)).unwrap_or(i32::MAX);
        v.cq = Some(
            ctx.create_cq(cqe, 0)
                .map_err(|e| v.unavailable("creating the completion queue", e))?,
        );
        v.pd = Some(
            ctx.alloc_pd()
                .map_err(|e| v.unavailable("allocating the protection domain", e))?,
        );
        Ok(v)
    }

    pub(super) fn unavailable(&self, what: &str, e: io::Error) -> TransportError {
        TransportError::Unavailable(format!("RDMA device {}: {what} failed: {e}", self.name))
    }

    pub(super) fn cq(&self) -> &CompletionQueue<'static> {
        self.cq.as_ref().expect("set in with_context")
    }

    pub(super) fn pd(&self) -> &ProtectionDomain<'static> {
        self.pd.as_ref().expect("set in with_context")
    }

    /// Creates an RC queue pair on the shared completion queue.
    ///
    /// # Safety
    ///
    /// The queue pair borrows this protection domain and completion queue
    /// (and the context) for `'static`: the caller must drop it before the
    /// last `Arc<Verbs>` goes. [`Link`] holds the queue pair and an
    /// `Arc<Verbs>` declared after it, so it is dropped first.
    pub(super) unsafe fn prepare_qp(&self) -> io::Result<PreparedQueuePair<'static>> {
        // SAFETY: `pd` and `cq` live as long as `self`, which by this
        // function's contract outlives the queue pair made from them.
        let pd: &'static ProtectionDomain<'static> =
            unsafe { &*(self.pd() as *const ProtectionDomain<'static>) };
        // SAFETY: as above.
        let cq: &'static CompletionQueue<'static> =
            unsafe { &*(self.cq() as *const CompletionQueue<'static>) };
        let mut b = pd.create_qp(cq, cq, ibverbs::ibv_qp_type::IBV_QPT_RC);
        b.set_max_send_wr(SEND_SLOTS as u32)
            .set_max_recv_wr(RECV_DEPTH as u32)
            .set_timeout(QP_TIMEOUT)
            .set_retry_count(QP_RETRY)
            .set_rnr_retry(QP_RNR_RETRY);
        if let Some(g) = self.gid_index {
            b.set_gid_index(g);
        }
        b.build()
    }
}

impl Drop for Verbs {
    fn drop(&mut self) {
        drop(self.cq.take());
        drop(self.pd.take());
        // SAFETY: `ctx` was leaked from a `Box` in `with_context` and is freed
        // only here. Nothing borrows it any more: the completion queue and
        // protection domain were just dropped, and every queue pair and memory
        // region lives in a `Link` that holds an `Arc<Verbs>`, so they are
        // gone before this runs.
        drop(unsafe { Box::from_raw(self.ctx as *const Context as *mut Context) });
    }
}

/// Picks the GID to route with: RoCE v2 over IPv4 first, then any RoCE v2,
/// then the first valid entry (InfiniBand).
fn pick_gid(table: &[GidEntry]) -> Option<u32> {
    let v4_mapped = |g: &Gid| g.subnet_prefix() == 0 && (g.interface_id() >> 32) == 0xffff;
    table
        .iter()
        .enumerate()
        .filter(|(i, e)| e.gid_index as usize == *i && e.gid != Gid::default())
        .max_by_key(|(i, e)| {
            (
                e.gid_type == GID_TYPE_ROCE_V2,
                v4_mapped(&e.gid),
                std::cmp::Reverse(*i),
            )
        })
        .map(|(i, _)| i as u32)
}

/// Work request ids: peer in bits 32..48, bit 31 set for receives, slot below.
const RECV_BIT: u64 = 1 << 31;

/// The id of a work request: `recv` for a receive buffer, else a send slot.
pub(super) fn wr_id(peer: NodeId, recv: bool, slot: usize) -> u64 {
    let recv_bit = if recv { RECV_BIT } else { 0 };
    (u64::from(peer) << 32) | recv_bit | slot as u64
}

/// Peer, receive or not, and slot of a work request id.
pub(super) fn split_wr_id(id: u64) -> (NodeId, bool, usize) {
    (
        (id >> 32) as NodeId,
        id & RECV_BIT != 0,
        (id & (RECV_BIT - 1)) as usize,
    )
}

/// What a failed work completion's status means, in words.
pub(super) fn wc_status_name(status: ibverbs::ibv_wc_status::Type) -> &'static str {
    use ibverbs::ibv_wc_status::*;
    match status {
        IBV_WC_LOC_LEN_ERR => "local length error",
        IBV_WC_LOC_QP_OP_ERR => "local QP operation error",
        IBV_WC_LOC_PROT_ERR => "local protection error",
        IBV_WC_WR_FLUSH_ERR => "work request flushed",
        IBV_WC_REM_INV_REQ_ERR => "remote invalid request",
        IBV_WC_REM_ACCESS_ERR => "remote access error",
        IBV_WC_REM_OP_ERR => "remote operation error",
        IBV_WC_RETRY_EXC_ERR => "transport retry counter exceeded (peer unreachable)",
        IBV_WC_RNR_RETRY_EXC_ERR => "receiver-not-ready retry counter exceeded",
        IBV_WC_FATAL_ERR => "fatal error",
        IBV_WC_GENERAL_ERR => "general error",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_wr_ids_roundtrip() {
        for (peer, recv, slot) in [(0, false, 0), (63, true, RECV_DEPTH - 1), (5, true, 3)] {
            assert_eq!(split_wr_id(wr_id(peer, recv, slot)), (peer, recv, slot));
        }
    }

    #[test]
    fn completion_errors_are_named() {
        use ibverbs::ibv_wc_status::*;
        assert!(wc_status_name(IBV_WC_RETRY_EXC_ERR).contains("retry counter exceeded"));
        assert_eq!(wc_status_name(IBV_WC_WR_FLUSH_ERR), "work request flushed");
    }
}
