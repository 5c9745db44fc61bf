//! Meta contexts: which ones an export offers, their ids, and how queries select them.
//!
//! Ids follow QEMU: `base:allocation` is 0, `qemu:allocation-depth` is 1 and every other
//! context (the dirty bitmaps) is 2 + its index among them in [`crate::Export::meta_contexts`]
//! order.

use crate::export::{ALLOCATION_DEPTH, BASE_ALLOCATION};

/// One meta context of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// The id used in BLOCK_STATUS chunks.
    pub id: u32,
    /// Its full name.
    pub name: String,
}

/// Every context an export offers, in id order: `base:allocation` and `others`
/// (the names from [`crate::Export::meta_contexts`]; duplicates and a repeated
/// `base:allocation` are ignored).
pub fn available(others: &[String]) -> Vec<MetaContext> {
    let mut out = vec![MetaContext {
        id: 0,
        name: BASE_ALLOCATION.to_string(),
    }];
    let mut next = 2u32;
    let mut depth = None;
    for name in others {
        if name == BASE_ALLOCATION || out.iter().any(|c| &c.name == name) {
            continue;
        }
        if name == ALLOCATION_DEPTH {
            if depth.is_none() {
                depth = Some(MetaContext {
                    id: 1,
                    name: name.clone(),
                });
            }
            continue;
        }
        out.push(MetaContext {
            id: next,
            name: name.clone(),
        });
        next = next.saturating_add(1);
    }
    if let Some(d) = depth {
        out.insert(1, d);
    }
    out
}

/// The contexts `NBD_OPT_LIST_META_CONTEXT` returns for `queries`: all of them when there
/// are no queries (`query_count == 0`); a query ending in `:` (`base:`, `qemu:`,
/// `qemu:dirty-bitmap:`) lists every context under that prefix; any other query must
/// name a context exactly. Unknown queries match nothing. Result in id order, no repeats.
pub fn list(all: &[MetaContext], query_count: u32, queries: &[Vec<u8>]) -> Vec<MetaContext> {
    if query_count == 0 {
        return all.to_vec();
    }
    all.iter()
        .filter(|c| {
            queries.iter().any(|q| {
                let q = q.as_slice();
                if q.last() == Some(&b':') {
                    c.name.as_bytes().starts_with(q)
                } else {
                    c.name.as_bytes() == q
                }
            })
        })
        .cloned()
        .collect()
}

/// The contexts `NBD_OPT_SET_META_CONTEXT` selects for `queries`: exact names only (a bare
/// namespace or `qemu:dirty-bitmap:` with an empty bitmap name selects nothing). Result in
/// id order, no repeats.
pub fn select(all: &[MetaContext], queries: &[Vec<u8>]) -> Vec<MetaContext> {
    all.iter()
        .filter(|c| queries.iter().any(|q| c.name.as_bytes() == q.as_slice()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[MetaContext]) -> Vec<(u32, &str)> {
        v.iter().map(|c| (c.id, c.name.as_str())).collect()
    }

    fn ctxs() -> Vec<MetaContext> {
        available(&[
            "qemu:dirty-bitmap:b0".to_string(),
            ALLOCATION_DEPTH.to_string(),
            "qemu:dirty-bitmap:b1".to_string(),
        ])
    }

    fn q(s: &[&str]) -> Vec<Vec<u8>> {
        s.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn ids_like_qemu() {
        assert_eq!(
            names(&ctxs()),
            vec![
                (0, "base:allocation"),
                (1, "qemu:allocation-depth"),
                (2, "qemu:dirty-bitmap:b0"),
                (3, "qemu:dirty-bitmap:b1"),
            ]
        );
        // Without depth, bitmaps still start at 2; duplicates ignored.
        let c = available(&[
            "qemu:dirty-bitmap:x".into(),
            "qemu:dirty-bitmap:x".into(),
            "base:allocation".into(),
        ]);
        assert_eq!(
            names(&c),
            vec![(0, "base:allocation"), (2, "qemu:dirty-bitmap:x")]
        );
    }

    #[test]
    fn list_queries() {
        let all = ctxs();
        assert_eq!(list(&all, 0, &[]).len(), 4, "no query lists everything");
        assert_eq!(
            names(&list(&all, 1, &q(&["qemu:dirty-bitmap:"]))),
            vec![(2, "qemu:dirty-bitmap:b0"), (3, "qemu:dirty-bitmap:b1")]
        );
        assert_eq!(
            names(&list(&all, 1, &q(&["qemu:"]))),
            vec![
                (1, "qemu:allocation-depth"),
                (2, "qemu:dirty-bitmap:b0"),
                (3, "qemu:dirty-bitmap:b1")
            ]
        );
        assert_eq!(
            names(&list(&all, 1, &q(&["base:"]))),
            vec![(0, "base:allocation")]
        );
        assert_eq!(
            names(&list(
                &all,
                3,
                &q(&["qemu:dirty-bitmap:b1", "nope:", "qemu:dirty-bitmap:b1"])
            )),
            vec![(3, "qemu:dirty-bitmap:b1")]
        );
        // Queries were sent but all dropped (too long): nothing, not everything.
        assert!(list(&all, 1, &[]).is_empty());
        assert!(list(&all, 1, &q(&["qemu:dirty-bitmap:b"])).is_empty());
        assert!(list(&all, 1, &q(&[""])).is_empty());
    }

    #[test]
    fn set_queries_exact_only() {
        let all = ctxs();
        assert!(select(&all, &[]).is_empty());
        assert!(select(&all, &q(&["qemu:", "qemu:dirty-bitmap:", "base:"])).is_empty());
        assert_eq!(
            names(&select(
                &all,
                &q(&[
                    "qemu:dirty-bitmap:b1",
                    "base:allocation",
                    "unknown:x",
                    "base:allocation"
                ])
            )),
            vec![(0, "base:allocation"), (3, "qemu:dirty-bitmap:b1")]
        );
    }
}
