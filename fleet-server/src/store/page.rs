//! Keyset pagination: a page of items and an opaque cursor to the next one.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::StoreError;

/// Most items one page may hold.
pub const PAGE_LIMIT_MAX: u32 = 1_000;

/// Where the next page starts. Opaque: hand back what a [`Page`] returned
/// (e.g. through an HTTP query parameter); a cursor of another query is
/// refused with [`StoreError::InvalidCursor`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor(String);

impl Cursor {
    /// Wraps cursor text received from a client.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The cursor text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `{kind}:{parts joined by ':'}`; the last part may contain anything but
    /// earlier ones must not contain ':'.
    pub(crate) fn encode(kind: &str, parts: &[&str]) -> Self {
        Self(format!("{kind}:{}", parts.join(":")))
    }

    /// The `count` parts of a cursor of `kind`.
    pub(crate) fn decode(&self, kind: &str, count: usize) -> Result<Vec<&str>, StoreError> {
        let rest = self
            .0
            .strip_prefix(kind)
            .and_then(|r| r.strip_prefix(':'))
            .ok_or(StoreError::InvalidCursor)?;
        let parts: Vec<&str> = rest.splitn(count, ':').collect();
        if parts.len() == count { Ok(parts) } else { Err(StoreError::InvalidCursor) }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How many items to return and where to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// 1..=[`PAGE_LIMIT_MAX`].
    pub limit: u32,
    /// `None` for the first page, then [`Page::next`].
    pub cursor: Option<Cursor>,
}

impl PageRequest {
    /// The first page of `limit` items.
    pub fn first(limit: u32) -> Self {
        Self { limit, cursor: None }
    }

    /// The page after `cursor`.
    pub fn after(limit: u32, cursor: Cursor) -> Self {
        Self { limit, cursor: Some(cursor) }
    }

    /// The limit, checked against [`PAGE_LIMIT_MAX`].
    pub(crate) fn checked_limit(&self) -> Result<u32, StoreError> {
        if (1..=PAGE_LIMIT_MAX).contains(&self.limit) {
            Ok(self.limit)
        } else {
            Err(StoreError::LimitOutOfRange { limit: self.limit, max: PAGE_LIMIT_MAX })
        }
    }
}

impl Default for PageRequest {
    fn default() -> Self {
        Self::first(100)
    }
}

/// One page of results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    /// The items, in the query's order.
    pub items: Vec<T>,
    /// Where the next page starts; `None` when this is the last page.
    pub next: Option<Cursor>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` fetched rows: the extra row only
    /// tells that there is more, and the cursor points after the last kept.
    pub(crate) fn from_rows(mut rows: Vec<T>, limit: u32, cursor_of: impl Fn(&T) -> Cursor) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more { rows.last().map(cursor_of) } else { None };
        Self { items: rows, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_refuses_other_kinds() {
        let cursor = Cursor::encode("det", &["12", "3", "cam:1"]);
        assert_eq!(cursor.decode("det", 3).unwrap(), ["12", "3", "cam:1"]);
        assert!(matches!(cursor.decode("dev", 1), Err(StoreError::InvalidCursor)));
        assert!(matches!(Cursor::new("det:1").decode("det", 3), Err(StoreError::InvalidCursor)));
    }

    #[test]
    fn page_keeps_limit_and_points_after_the_last() {
        let page = Page::from_rows(vec![1, 2, 3], 2, |n| Cursor::new(n.to_string()));
        assert_eq!(page.items, [1, 2]);
        assert_eq!(page.next, Some(Cursor::new("2")));
        let last = Page::from_rows(vec![1, 2], 2, |n| Cursor::new(n.to_string()));
        assert_eq!(last.next, None);
    }

    #[test]
    fn limits_are_checked() {
        assert!(PageRequest::first(0).checked_limit().is_err());
        assert!(
            PageRequest::first(PAGE_LIMIT_MAX + 1)
                .checked_limit()
                .is_err()
        );
        assert_eq!(PageRequest::first(PAGE_LIMIT_MAX).checked_limit().unwrap(), PAGE_LIMIT_MAX);
    }
}
