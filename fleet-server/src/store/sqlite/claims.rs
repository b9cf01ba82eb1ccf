//! Claim tokens and the factory allow-list.

use rusqlite::{Connection, Row, params};

use super::SqliteStore;
use super::codec::{Query, first, int, text};
use crate::store::device::check_label;
use crate::store::secret::{hex, unhex};
use crate::store::{
    AllowedIdentity, ClaimStore, ClaimTokenInfo, Cursor, NewClaimToken, Page, PageRequest, SecretDigest,
    StoreError, StoreFuture, UnixMillis,
};

const TOKEN_SELECT: &str = "SELECT id, secret_digest, uses_max, uses, expires_at_ms, created_at_ms,
    revoked_at_ms, label FROM claim_tokens";
const ALLOWED_SELECT: &str = "SELECT identity_key, note, created_at_ms FROM factory_allowlist";

fn token_from_row(row: &Row<'_>) -> Result<ClaimTokenInfo, StoreError> {
    Ok(ClaimTokenInfo {
        id: row.get("id")?,
        secret_digest: SecretDigest::from_bytes(row.get("secret_digest")?),
        uses_max: row.get("uses_max")?,
        uses: row.get("uses")?,
        expires_at_ms: row.get("expires_at_ms")?,
        created_at_ms: row.get("created_at_ms")?,
        revoked_at_ms: row.get("revoked_at_ms")?,
        label: row.get("label")?,
    })
}

fn allowed_from_row(row: &Row<'_>) -> Result<AllowedIdentity, StoreError> {
    Ok(AllowedIdentity {
        identity_key: row.get("identity_key")?,
        note: row.get("note")?,
        created_at_ms: row.get("created_at_ms")?,
    })
}

fn create_token(
    tx: &Connection,
    now: UnixMillis,
    token: &NewClaimToken,
) -> Result<ClaimTokenInfo, StoreError> {
    token.validate()?;
    if token.expires_at_ms <= now {
        return Err(StoreError::invalid("claim token would already be expired"));
    }
    if get_token(tx, &token.id)?.is_some() {
        return Err(StoreError::ClaimTokenExists(token.id.clone()));
    }
    tx.execute(
        "INSERT INTO claim_tokens (id, secret_digest, label, uses_max, expires_at_ms, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            token.id,
            &token.secret_digest.as_bytes()[..],
            token.label,
            token.uses_max,
            token.expires_at_ms,
            now
        ],
    )?;
    get_token(tx, &token.id)?.ok_or_else(|| StoreError::corrupt("claim token vanished after insert"))
}

fn get_token(conn: &Connection, id: &str) -> Result<Option<ClaimTokenInfo>, StoreError> {
    first(conn, &format!("{TOKEN_SELECT} WHERE id = ?1"), [id], token_from_row)
}

fn list_tokens(conn: &Connection, page: &PageRequest) -> Result<Page<ClaimTokenInfo>, StoreError> {
    let limit = page.checked_limit()?;
    let mut sql = Query::new(TOKEN_SELECT);
    if let Some(cursor) = &page.cursor {
        let [after] = cursor.decode("claim", 1)?[..] else {
            return Err(StoreError::InvalidCursor);
        };
        sql.and("id > ?", [text(after)]);
    }
    let rows = sql.run(conn, "ORDER BY id LIMIT ?", [int(limit + 1)], token_from_row)?;
    Ok(Page::from_rows(rows, limit, |t| Cursor::encode("claim", &[&t.id])))
}

fn revoke_token(tx: &Connection, now: UnixMillis, id: &str) -> Result<(), StoreError> {
    let changed = tx.execute(
        "UPDATE claim_tokens SET revoked_at_ms = coalesce(revoked_at_ms, ?2) WHERE id = ?1",
        params![id, now],
    )?;
    if changed == 0 { Err(StoreError::ClaimTokenNotFound(id.to_owned())) } else { Ok(()) }
}

/// Consumes one use of a claim token, refusing a missing, revoked, expired
/// or used-up one. Runs inside the transaction that creates the device.
pub(super) fn consume_use(tx: &Connection, now: UnixMillis, id: &str) -> Result<(), StoreError> {
    let token = get_token(tx, id)?.ok_or_else(|| StoreError::ClaimTokenNotFound(id.to_owned()))?;
    token.check_usable(now)?;
    tx.execute("UPDATE claim_tokens SET uses = uses + 1 WHERE id = ?1", [id])?;
    Ok(())
}

/// The allow-list entry of an identity key.
pub(super) fn allowed(
    conn: &Connection,
    identity_key: &[u8; 32],
) -> Result<Option<AllowedIdentity>, StoreError> {
    first(conn, &format!("{ALLOWED_SELECT} WHERE identity_key = ?1"), [&identity_key[..]], allowed_from_row)
}

fn allow(
    tx: &Connection,
    now: UnixMillis,
    identity_key: &[u8; 32],
    note: &str,
) -> Result<AllowedIdentity, StoreError> {
    check_label("allow-list note", note)?;
    tx.execute(
        "INSERT INTO factory_allowlist (identity_key, note, created_at_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (identity_key) DO UPDATE SET note = excluded.note",
        params![&identity_key[..], note, now],
    )?;
    allowed(tx, identity_key)?.ok_or_else(|| StoreError::corrupt("allow-list entry vanished after insert"))
}

fn disallow(tx: &Connection, identity_key: &[u8; 32]) -> Result<bool, StoreError> {
    Ok(tx.execute("DELETE FROM factory_allowlist WHERE identity_key = ?1", [&identity_key[..]])? > 0)
}

fn list_allowed(conn: &Connection, page: &PageRequest) -> Result<Page<AllowedIdentity>, StoreError> {
    let limit = page.checked_limit()?;
    let mut sql = Query::new(ALLOWED_SELECT);
    if let Some(cursor) = &page.cursor {
        let [after] = cursor.decode("allow", 1)?[..] else {
            return Err(StoreError::InvalidCursor);
        };
        let after = unhex::<32>(after).ok_or(StoreError::InvalidCursor)?;
        sql.and("identity_key > ?", [rusqlite::types::Value::Blob(after.to_vec())]);
    }
    let rows = sql.run(conn, "ORDER BY identity_key LIMIT ?", [int(limit + 1)], allowed_from_row)?;
    Ok(Page::from_rows(rows, limit, |a| Cursor::encode("allow", &[&hex(&a.identity_key)])))
}

impl ClaimStore for SqliteStore {
    fn create_claim_token(&self, token: NewClaimToken) -> StoreFuture<'_, ClaimTokenInfo> {
        Box::pin(self.write(move |tx, now| create_token(tx, now, &token)))
    }

    fn get_claim_token(&self, id: String) -> StoreFuture<'_, Option<ClaimTokenInfo>> {
        Box::pin(self.read(move |conn, _| get_token(conn, &id)))
    }

    fn list_claim_tokens(&self, page: PageRequest) -> StoreFuture<'_, Page<ClaimTokenInfo>> {
        Box::pin(self.read(move |conn, _| list_tokens(conn, &page)))
    }

    fn revoke_claim_token(&self, id: String) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |tx, now| revoke_token(tx, now, &id)))
    }

    fn allow_identity(&self, identity_key: [u8; 32], note: String) -> StoreFuture<'_, AllowedIdentity> {
        Box::pin(self.write(move |tx, now| allow(tx, now, &identity_key, &note)))
    }

    fn disallow_identity(&self, identity_key: [u8; 32]) -> StoreFuture<'_, bool> {
        Box::pin(self.write(move |tx, _| disallow(tx, &identity_key)))
    }

    fn list_allowed_identities(&self, page: PageRequest) -> StoreFuture<'_, Page<AllowedIdentity>> {
        Box::pin(self.read(move |conn, _| list_allowed(conn, &page)))
    }

    fn allowed_identity(&self, identity_key: [u8; 32]) -> StoreFuture<'_, Option<AllowedIdentity>> {
        Box::pin(self.read(move |conn, _| allowed(conn, &identity_key)))
    }
}
