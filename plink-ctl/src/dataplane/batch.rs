//! Walking a whole hash map with BPF_MAP_LOOKUP_BATCH: thousands of entries
//! per system call instead of two calls per entry (get-next-key, lookup).
//! The GC walks the conntrack maps every second; at a million flows the
//! per-entry walk alone kept half a core busy.

use std::os::fd::RawFd;

/// Entries asked for per call. A bucket never holds nearly as many; one
/// that did would make the call fail with ENOSPC, and the walk falls back.
const BATCH: usize = 4096;

/// The kernel's own "operation not supported" (not in libc: it never reaches
/// C programs through glibc's names), returned for maps without batch ops.
const ENOTSUPP: i32 = 524;

/// How far a walk in slices got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walked {
    /// The kernel has no batch operations for this map (before 5.6):
    /// nothing was read, the caller walks key by key.
    Unsupported,
    /// Stopped after the batches allowed; `cursor` says where to go on.
    More,
    /// The end of the map was reached; `cursor` is back at its start.
    Done,
}

/// Calls `each` with every (key, value) of the hash map `fd` holds, a batch
/// at a time (each bucket is read atomically; entries added or removed
/// meanwhile may or may not be seen, as with any walk). Returns `Ok(false)`
/// without calling `each` when the kernel has no batch operations for this
/// map — the caller then walks key by key.
pub fn walk<K: aya::Pod, V: aya::Pod>(
    fd: RawFd,
    each: impl FnMut(&K, &V),
) -> std::io::Result<bool> {
    let mut cursor = None;
    Ok(walk_some(fd, &mut cursor, usize::MAX, each)? == Walked::Done)
}

/// Like [`walk`], for at most `max_batches` batches from `cursor` (`None`:
/// the start of the map), which is left where the next call goes on.
pub fn walk_some<K: aya::Pod, V: aya::Pod>(
    fd: RawFd,
    cursor: &mut Option<u64>,
    max_batches: usize,
    mut each: impl FnMut(&K, &V),
) -> std::io::Result<Walked> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let mut keys: Vec<K> = Vec::with_capacity(BATCH);
    let mut values: Vec<V> = Vec::with_capacity(BATCH);
    // The batch token of a hash map is a bucket index (u32); room for more.
    let mut token_out = [0u64; 1];
    for batch in 0..max_batches {
        let token_in = [cursor.unwrap_or(0)];
        // union bpf_attr, batch: in_batch, out_batch, keys, values,
        // count (u32) + map_fd (u32), elem_flags, flags.
        let mut attr = [0u64; 8];
        attr[0] = if cursor.is_some() {
            token_in.as_ptr() as u64
        } else {
            0
        };
        attr[1] = token_out.as_mut_ptr() as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = BATCH as u64 | (fd as u32 as u64) << 32;
        let done = match super::bpf_cmd(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(()) => false,
            // The last batch: what it holds is in `count`.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e)
                if batch == 0
                    && cursor.is_none()
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
                    ) =>
            {
                return Ok(Walked::Unsupported);
            }
            Err(e) => return Err(e),
        };
        let count = ((attr[4] & 0xffff_ffff) as usize).min(BATCH);
        // SAFETY: the kernel wrote `count` whole keys and values (their sizes
        // are the map's, checked against K and V when the map was opened).
        unsafe {
            keys.set_len(count);
            values.set_len(count);
        }
        for (k, v) in keys.iter().zip(&values) {
            each(k, v);
        }
        // SAFETY: plain data; the buffers are refilled from the start.
        unsafe {
            keys.set_len(0);
            values.set_len(0);
        }
        if done {
            *cursor = None;
            return Ok(Walked::Done);
        }
        *cursor = Some(token_out[0]);
    }
    Ok(Walked::More)
}
