"""The adapter side of the Service, in the caller's namespace: uploads (whole, or streamed as their bytes
arrive), listing and paging, deletion, and the model list (base, stored and --adapter-source adapters).
`Service` (service.py) is an AdapterAdmin: these methods use its registry, engine, metrics, config, sources
and upload lock; request admission stays in service.py.
"""
from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import time
from concurrent.futures import Future

from .adapters.incoming import IncomingWeights
from .adapters.peft_format import AdapterError, refuse_pickle
from .adapters.registry import AdapterRef
from .adapters.store import Staged, StoredAdapter, check_adapter_id
from .tenants import Tenant

BASE_MODEL_ID = "base"
log = logging.getLogger("loraplex.service")


class AdapterAdmin:
    def _own(self, tenant: Tenant, record: StoredAdapter) -> StoredAdapter | None:
        own_id = tenant.own_id(record.id)
        return None if own_id is None else dataclasses.replace(record, id=own_id)

    def _check_own_id(self, adapter_id: str) -> None:
        check_adapter_id(adapter_id)
        if adapter_id in (BASE_MODEL_ID, self.base.name):
            raise AdapterError(f"adapter id {adapter_id!r} is reserved for the base model", 400)

    def _not_found(self, adapter_id: str) -> AdapterError:
        return AdapterError(f"adapter {adapter_id!r} not found", 404)

    async def upload_adapter(self, tenant: Tenant, adapter_id: str, config_raw: bytes,
                             weights_raw: bytes) -> StoredAdapter:
        try:
            self._check_own_id(adapter_id)
            refuse_pickle(weights_raw)
            record = await asyncio.to_thread(self._upload, tenant, adapter_id, config_raw, weights_raw)
        except AdapterError:
            self.metrics.uploads.labels("rejected").inc()
            raise
        self.metrics.uploads.labels("ok").inc()
        return self._own(tenant, record)

    # A streamed upload: open_upload() when its weights start, IncomingWeights.write() as they arrive, then
    # upload_received() once the request is read, or refuse_upload() when the transport refuses it first.
    def check_upload_id(self, tenant: Tenant, adapter_id: str) -> None:
        """The checks an upload's id gets before its weights are read (no disk access: it runs on the event
        loop): valid, not the base model's, not too long for the tenant. Its count is checked at the commit."""
        self._check_own_id(adapter_id)
        self._stored_upload_id(tenant, adapter_id)

    def open_upload(self, capacity: int | None = None, weights_sha256: bool = False) -> IncomingWeights:
        """Where a streamed upload's weights go as they arrive (a temporary directory of the store)."""
        return IncomingWeights(self.registry.store, self.registry.max_bytes, capacity, weights_sha256)

    async def refuse_upload(self, incoming: IncomingWeights | None) -> None:
        """A streamed upload refused before upload_received (its body, its form, the client gone): nothing stays."""
        if incoming is not None:
            await incoming.discard()
        self.metrics.uploads.labels("rejected").inc()

    async def upload_received(self, tenant: Tenant, adapter_id: str, config_raw: bytes,
                              incoming: IncomingWeights) -> StoredAdapter:
        """Commit a streamed upload whose bytes are all in: validated (off the event loop) while its files are
        synced, then published; refused, its temporary directory is gone before this returns."""
        received = time.perf_counter()
        try:
            self._check_own_id(adapter_id)
            sealing = await incoming.seal(config_raw)
            record = await asyncio.to_thread(self._upload, tenant, adapter_id, config_raw, incoming.data, sealing, True)
            log.info("upload %s: %.1f MB received in %.0f ms, then synced in %.0f ms beside its validation, validated "
                     "and committed in %.0f ms", record.id, incoming.size / 1e6, 1e3 * (received - incoming.opened),
                     incoming.seal_ms, 1e3 * (time.perf_counter() - received))
        except BaseException as e:
            await incoming.discard()
            if isinstance(e, AdapterError):
                self.metrics.uploads.labels("rejected").inc()
            raise
        finally:
            incoming.release()
        self.metrics.uploads.labels("ok").inc()
        return self._own(tenant, record)

    def _pack_soon(self, adapter_id: str, weights) -> None:
        """Pack a validated upload for loading (pinned host memory in the kernels' layout) on a worker thread,
        from before its commit: its first request then pays only the transfer and its prefill (issue #20). (An
        upload refused at the commit, or not cached for want of host memory, drops the packed copy with it.)"""
        def prepare():
            try:
                self.engine.prepare_adapter(AdapterRef(adapter_id, 0, weights))
            except Exception as e:  # noqa: BLE001 - the first request packs it again and reports a failure
                log.warning("packing adapter %s after its upload failed: %s", adapter_id, e)
        self._preparing.submit(prepare)

    def _stored_upload_id(self, tenant: Tenant, adapter_id: str) -> str:
        stored_id = tenant.stored_id(adapter_id)
        try:
            check_adapter_id(stored_id)
        except AdapterError:
            raise AdapterError(f"adapter id {adapter_id!r} is too long for tenant {tenant.name!r}", 400) from None
        return stored_id

    def _check_adapter_count(self, tenant: Tenant) -> None:
        owned = len(self.list_adapters(tenant))
        if owned >= self.config.max_adapters_per_tenant:
            raise AdapterError(f"tenant {tenant.name!r} already has {owned} adapters, the limit; "
                               "delete one first", 403)

    def _upload(self, tenant: Tenant, adapter_id: str, config_raw: bytes, weights_raw,
                staged: Staged | Future | None = None, owned: bool = False) -> StoredAdapter:
        try:
            stored_id = self._stored_upload_id(tenant, adapter_id)
            with self._upload_lock:
                if not tenant.admin and self.registry.store.get(stored_id) is None:
                    self._check_adapter_count(tenant)
                return self.registry.upload(stored_id, config_raw, weights_raw, staged, owned,
                                            on_validated=lambda weights: self._pack_soon(stored_id, weights))
        except BaseException:
            self.registry.discard_staged(staged)
            raise

    def list_adapters(self, tenant: Tenant) -> list[StoredAdapter]:
        return [own for record in self.registry.list() if (own := self._own(tenant, record)) is not None]

    def get_adapter(self, tenant: Tenant, adapter_id: str) -> StoredAdapter:
        self._check_own_id(adapter_id)
        try:
            return self._own(tenant, self.registry.get(tenant.stored_id(adapter_id)))
        except AdapterError as e:
            raise self._not_found(adapter_id) if e.status in (400, 404) else e

    def delete_adapter(self, tenant: Tenant, adapter_id: str) -> StoredAdapter:
        self._check_own_id(adapter_id)
        try:
            record = self.registry.delete(tenant.stored_id(adapter_id))
        except AdapterError as e:
            raise self._not_found(adapter_id) if e.status in (400, 404) else e
        self.metrics.forget_adapter(record.id, record.version)
        return self._own(tenant, record)

    def _own_ids(self, tenant: Tenant) -> list[str]:
        """The ids of the tenant's stored adapters, sorted (one directory read; no adapter file opened)."""
        return [own for stored in self.registry.store.ids() if (own := tenant.own_id(stored)) is not None]

    def list_adapters_page(self, tenant: Tenant, limit: int | None = None,
                           after: str | None = None) -> tuple[list[StoredAdapter], bool]:
        """Up to `limit` of the tenant's adapters with ids after `after`, by id; and whether more follow."""
        ids = self._own_ids(tenant)
        page, more = [], False
        for adapter_id in ids[0 if after is None else bisect.bisect_right(ids, after):]:
            record = self.registry.store.get(tenant.stored_id(adapter_id))
            if record is None:  # deleted meanwhile
                continue
            if limit is not None and len(page) == limit:
                more = True
                break
            page.append(self._own(tenant, record))
        return page, more

    def models_page(self, tenant: Tenant, limit: int | None = None, after: str | None = None) -> tuple[list[dict], bool]:
        """The base model first, then the tenant's stored adapters and every --adapter-source adapter (a stored
        adapter hides a source one of its id), by id: up to `limit` entries after `after`; and whether more follow.
        Source adapters are listed from their folders' names, without reading them."""
        stored = self._own_ids(tenant)
        own = set(stored)
        sources = {i for source in self._own_sources(tenant) + self.sources for i in source.ids()
                   if i not in own and i != self.base.name}
        entries = [(0, BASE_MODEL_ID, "base")] + sorted([(1, i, "store") for i in stored] +
                                                         [(1, i, "source") for i in sources])
        start = 0
        if after is not None:
            start = bisect.bisect_right(entries, (0, BASE_MODEL_ID, "~") if after == BASE_MODEL_ID else (1, after, "~"))
        page, more = [], False
        common = {"object": "model", "owned_by": "loraplex", "root": self.base.name}
        for _, entry_id, kind in entries[start:]:
            if kind == "base":
                entry = {"id": BASE_MODEL_ID, **common}
            elif kind == "source":
                entry = {"id": entry_id, **common, "parent": BASE_MODEL_ID, "source": "adapter-source"}
            else:
                record = self.registry.store.get(tenant.stored_id(entry_id))
                if record is None:
                    continue
                entry = {"id": entry_id, **common, "parent": BASE_MODEL_ID, "version": record.version}
            if limit is not None and len(page) == limit:
                more = True
                break
            page.append(entry)
        return page, more

    def models(self, tenant: Tenant) -> list[dict]:
        return self.models_page(tenant)[0]


def adapter_json(a: StoredAdapter) -> dict:
    return {"id": a.id, "object": "adapter", "version": a.version, "peft_type": a.peft_type, "rank": a.rank,
            "size_bytes": a.size_bytes, "created": int(a.created)}
