//! Paged reads (backwards for time-ordered families, forwards for name-ordered ones, both a
//! [`Store::walk`]) and streaming prunes of a family: a page is read from one key on, never the
//! whole family; a
//! prune deletes in batches of [`PRUNE_BATCH`] keys, never holding more.

use rocksdb::IteratorMode;
use serde::de::DeserializeOwned;

use super::{Batch, Cf, Store, StoreError, Walk};

/// Keys deleted per batch by [`Store::prune_front`].
pub const PRUNE_BATCH: usize = 1000;

/// One page of records.
#[derive(Debug)]
pub struct Page<T> {
    /// The records, in the order read.
    pub items: Vec<T>,
    /// The key of the last record returned when more records may follow (the next page
    /// starts after it), `None` on the last page.
    pub next: Option<String>,
}

impl Store {
    /// Up to `size` values of `cf` that `keep` accepts, from the last key backwards (newest
    /// first for time-ordered keys), starting strictly before `before` when given. Reads one
    /// record past the page to know whether it is the last.
    pub fn page_back<T: DeserializeOwned>(
        &self,
        cf: Cf,
        before: Option<&str>,
        size: usize,
        keep: impl FnMut(&T) -> bool,
    ) -> Result<Page<T>, StoreError> {
        self.page(cf, "", Walk::Backward, before, size, keep)
    }

    /// Up to `size` values of `cf` under key prefix `prefix`, in key order, starting strictly
    /// after `after` when given (the forward twin of [`Store::page_back`], for lists ordered by
    /// name). Reads one record past the page to know whether it is the last.
    pub fn page_forward<T: DeserializeOwned>(
        &self,
        cf: Cf,
        prefix: &str,
        after: Option<&str>,
        size: usize,
    ) -> Result<Page<T>, StoreError> {
        // A token before the prefix starts at the prefix.
        let after = after.filter(|a| *a >= prefix);
        self.page(cf, prefix, Walk::Forward, after, size, |_| true)
    }

    /// One page of a [`Store::walk`]: up to `size` values `keep` accepts, and the last one's
    /// key when another accepted value follows.
    fn page<T: DeserializeOwned>(
        &self,
        cf: Cf,
        prefix: &str,
        dir: Walk,
        after: Option<&str>,
        size: usize,
        mut keep: impl FnMut(&T) -> bool,
    ) -> Result<Page<T>, StoreError> {
        let (mut items, mut last, mut more) = (Vec::new(), None, false);
        self.walk(cf, prefix, dir, after, |key, value: T| {
            if !keep(&value) {
                return true;
            }
            if items.len() == size {
                more = true;
                return false;
            }
            items.push(value);
            last = Some(key.to_owned());
            true
        })?;
        Ok(Page {
            items,
            next: last.filter(|_| more),
        })
    }

    /// Deletes the records of `cf` from its first key on while `old` says so (stopping at the
    /// first it refuses), in synced batches of [`PRUNE_BATCH`]; returns how many it deleted.
    pub fn prune_front<T: DeserializeOwned>(
        &self,
        cf: Cf,
        mut old: impl FnMut(&T) -> bool,
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let mut batch = Batch::default();
            let mut n = 0;
            let mut done = true;
            for item in self.db.iterator_cf(self.handle(cf), IteratorMode::Start) {
                let (k, v) = item.map_err(|source| StoreError::Io {
                    op: "prune",
                    cf: cf.name(),
                    key: String::new(),
                    source,
                })?;
                let key = String::from_utf8_lossy(&k).into_owned();
                let value: T = serde_json::from_slice(&v).map_err(|source| StoreError::Decode {
                    cf: cf.name(),
                    key: key.clone(),
                    source,
                })?;
                if !old(&value) {
                    break;
                }
                if n == PRUNE_BATCH {
                    done = false;
                    break;
                }
                batch.delete(cf, &key);
                n += 1;
            }
            if n > 0 {
                self.commit(batch)?;
                removed += n as u64;
            }
            if done {
                return Ok(removed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_every_record_once_and_prune_stops_at_the_first_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = Batch::default();
        for i in 0..2500u64 {
            b.put(Cf::Audit, &format!("{i:020}"), &i).unwrap();
        }
        store.commit(b).unwrap();
        for size in [1, 7, 1000] {
            let (mut seen, mut before, mut pages) = (Vec::new(), None::<String>, 0);
            loop {
                let p: Page<u64> = store
                    .page_back(Cf::Audit, before.as_deref(), size, |v: &u64| {
                        v.is_multiple_of(2)
                    })
                    .unwrap();
                assert!(p.items.len() <= size);
                seen.extend(p.items);
                pages += 1;
                match p.next {
                    Some(n) => before = Some(n),
                    None => break,
                }
            }
            let want: Vec<u64> = (0..2500)
                .rev()
                .filter(|v: &u64| v.is_multiple_of(2))
                .collect();
            assert_eq!(seen, want, "page size {size}");
            assert_eq!(pages, want.len().div_ceil(size), "page size {size}");
        }
        for size in [1, 7, 1000] {
            let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
            loop {
                let p: Page<u64> = store
                    .page_forward(Cf::Audit, "", after.as_deref(), size)
                    .unwrap();
                assert!(p.items.len() <= size);
                seen.extend(p.items);
                pages += 1;
                match p.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            assert_eq!(seen, (0..2500).collect::<Vec<u64>>(), "page size {size}");
            assert_eq!(pages, 2500usize.div_ceil(size), "page size {size}");
        }
        assert_eq!(
            store.prune_front(Cf::Audit, |v: &u64| *v < 2100).unwrap(),
            2100
        );
        let left: Vec<(String, u64)> = store.scan(Cf::Audit, "").unwrap();
        assert_eq!(left.len(), 400);
        assert_eq!(left[0].1, 2100);
    }
}
