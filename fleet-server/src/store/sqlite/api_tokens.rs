//! Operator API tokens.

use rusqlite::{Connection, Row, params};

use super::SqliteStore;
use super::codec::{Query, first, int};
use crate::store::device::check_label;
use crate::store::{
    ApiRole, ApiTokenInfo, ApiTokenStore, CreatedApiToken, Cursor, Page, PageRequest, StoreError,
    StoreFuture, TokenHash, UnixMillis, generate_api_token,
};

const TOKEN_SELECT: &str = "SELECT id, role, label, created_at_ms, revoked_at_ms FROM api_tokens";

fn token_from_row(row: &Row<'_>) -> Result<ApiTokenInfo, StoreError> {
    Ok(ApiTokenInfo {
        id: row.get("id")?,
        role: ApiRole::parse(&row.get::<_, String>("role")?)?,
        label: row.get("label")?,
        created_at_ms: row.get("created_at_ms")?,
        revoked_at_ms: row.get("revoked_at_ms")?,
    })
}

fn create(
    tx: &Connection,
    now: UnixMillis,
    role: ApiRole,
    label: &str,
    token: String,
    hash: TokenHash,
) -> Result<CreatedApiToken, StoreError> {
    let id: i64 = tx.query_row(
        "INSERT INTO api_tokens (token_hash, role, label, created_at_ms) VALUES (?1, ?2, ?3, ?4) RETURNING id",
        params![&hash.as_bytes()[..], role.as_str(), label, now],
        |row| row.get(0),
    )?;
    let info = ApiTokenInfo { id, role, label: label.to_owned(), created_at_ms: now, revoked_at_ms: None };
    Ok(CreatedApiToken { info, token })
}

fn list(conn: &Connection, page: &PageRequest) -> Result<Page<ApiTokenInfo>, StoreError> {
    let limit = page.checked_limit()?;
    let mut sql = Query::new(TOKEN_SELECT);
    if let Some(cursor) = &page.cursor {
        let [after] = cursor.decode("token", 1)?[..] else {
            return Err(StoreError::InvalidCursor);
        };
        let after: i64 = after.parse().map_err(|_| StoreError::InvalidCursor)?;
        sql.and("id > ?", [int(after)]);
    }
    let rows = sql.run(conn, "ORDER BY id LIMIT ?", [int(limit + 1)], token_from_row)?;
    Ok(Page::from_rows(rows, limit, |t| Cursor::encode("token", &[&t.id.to_string()])))
}

fn revoke(tx: &Connection, now: UnixMillis, id: i64) -> Result<(), StoreError> {
    let changed = tx.execute(
        "UPDATE api_tokens SET revoked_at_ms = coalesce(revoked_at_ms, ?2) WHERE id = ?1",
        params![id, now],
    )?;
    if changed == 0 { Err(StoreError::ApiTokenNotFound(id)) } else { Ok(()) }
}

fn by_hash(conn: &Connection, hash: &TokenHash) -> Result<Option<ApiTokenInfo>, StoreError> {
    first(conn, &format!("{TOKEN_SELECT} WHERE token_hash = ?1"), [&hash.as_bytes()[..]], token_from_row)
}

impl ApiTokenStore for SqliteStore {
    fn create_api_token(&self, role: ApiRole, label: String) -> StoreFuture<'_, CreatedApiToken> {
        Box::pin(async move {
            check_label("API token label", &label)?;
            let (token, hash) = generate_api_token()?;
            self.write(move |tx, now| create(tx, now, role, &label, token, hash))
                .await
        })
    }

    fn list_api_tokens(&self, page: PageRequest) -> StoreFuture<'_, Page<ApiTokenInfo>> {
        Box::pin(self.read(move |conn, _| list(conn, &page)))
    }

    fn revoke_api_token(&self, id: i64) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |tx, now| revoke(tx, now, id)))
    }

    fn api_token_by_hash(&self, hash: TokenHash) -> StoreFuture<'_, Option<ApiTokenInfo>> {
        Box::pin(self.read(move |conn, _| by_hash(conn, &hash)))
    }
}
