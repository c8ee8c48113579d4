"""KYC status records (``kyc_status``), read by the processor when KYC gating is on."""

from __future__ import annotations

from escrow_stream.db.pool import Database

VERIFIED = "VERIFIED"


class KycDirectory:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def verified(self, user_ids: frozenset[str]) -> frozenset[str]:
        """The subset of ``user_ids`` whose KYC status is VERIFIED."""
        if not user_ids:
            return frozenset()
        pool = await self._database.pool()
        rows = await pool.fetch(
            "SELECT user_id FROM kyc_status WHERE user_id = ANY($1::text[]) AND status = $2",
            list(user_ids),
            VERIFIED,
        )
        return frozenset(r["user_id"] for r in rows)

    async def status(self, user_id: str) -> str | None:
        pool = await self._database.pool()
        value: str | None = await pool.fetchval(
            "SELECT status FROM kyc_status WHERE user_id = $1", user_id
        )
        return value

    async def set_status(self, user_id: str, status: str, updated_by: str) -> None:
        pool = await self._database.pool()
        await pool.execute(
            """
            INSERT INTO kyc_status (user_id, status, updated_by, updated_at)
            VALUES ($1, $2, $3, now())
            ON CONFLICT (user_id) DO UPDATE
               SET status = EXCLUDED.status, updated_by = EXCLUDED.updated_by,
                   updated_at = now()
            """,
            user_id,
            status,
            updated_by,
        )
