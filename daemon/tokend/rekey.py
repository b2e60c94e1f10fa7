"""Re-encrypting stored tokens under the newest key (``tokend keys rotate``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from sqlalchemy import (
    Table,
    select,
    update,
)

from .errors import StoreError
from .rows import G, Reads
from .schema import ConsentStateRow

S = cast(Table, ConsentStateRow.__table__)


class Rekey(Reads):

    def reencrypt(self, batch: int = 500, *, rounds: int = 20,
                  progress: Callable[[int], None] | None = None) -> int:
        """Re-encrypt every token not under the newest key, in batches; resumable.

        Safe while daemons run: each row is written only if both ciphertexts are still
        the ones read (compare-and-swap). A refresh saved between the read and the write
        wins; the row is read again and, if still under an old key, rotated again.
        """
        done = 0
        last = 0
        while True:
            with self.tx(readonly=True) as conn:
                rows = conn.execute(
                    select(G.c.id, G.c.access_token, G.c.refresh_token)
                    .where(G.c.id > last).order_by(G.c.id).limit(batch)).all()
            if not rows:
                self._reencrypt_consents()
                return done
            last = rows[-1][0]
            if progress is not None:
                progress(len(rows))
            pending = [(r[0], r[1], r[2]) for r in rows]
            for _ in range(rounds):
                changed = []
                with self.tx() as conn:  # in id order, as every write of several rows
                    for gid, access, refresh in pending:
                        values = self._rotated(gid, access, refresh)
                        if not values:
                            continue
                        swapped = conn.execute(
                            update(G).where(G.c.id == gid,
                                            G.c.access_token.is_not_distinct_from(access),
                                            G.c.refresh_token.is_not_distinct_from(refresh))
                            .values(**values)).rowcount
                        if swapped:
                            done += 1
                        else:
                            changed.append(gid)
                if not changed:
                    break
                with self.tx(readonly=True) as conn:
                    pending = [(r[0], r[1], r[2]) for r in conn.execute(
                        select(G.c.id, G.c.access_token, G.c.refresh_token)
                        .where(G.c.id.in_(changed)).order_by(G.c.id)).all()]
            else:
                raise StoreError(f"{len(pending)} grant(s) kept changing while being "
                                 "re-encrypted; run `tokend keys rotate` again")

    def _rotated(self, gid: int, access: str | None, refresh: str | None) -> dict[str, str]:
        values = {}
        if access and self.cipher.needs_rotation(access):
            values["access_token"] = self.cipher.rotate(access, grant_id=gid)
        if refresh and self.cipher.needs_rotation(refresh):
            values["refresh_token"] = self.cipher.rotate(refresh, grant_id=gid)
        return values


    def _reencrypt_consents(self) -> int:
        """The PKCE verifiers of consents under way (``consent_states``, minutes-lived
        rows): a person who started a consent before the old key was dropped can still
        finish it. Each row only if unchanged since read; one that cannot be read with any
        key fails as a grant's token does."""
        with self.tx(readonly=True) as conn:
            rows = conn.execute(select(S.c.id, S.c.code_verifier)
                                .where(S.c.used_at.is_(None))).all()
        done = 0
        for sid, verifier in rows:
            if not verifier or not self.cipher.needs_rotation(verifier):
                continue
            rotated = self.cipher.rotate(verifier)
            with self.tx() as conn:
                done += conn.execute(update(S).where(
                    S.c.id == sid, S.c.code_verifier == verifier).values(
                        code_verifier=rotated)).rowcount
        return done
