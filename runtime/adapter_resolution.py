"""The `model` of a request, in the caller's namespace, to the adapter version it runs with: a stored adapter, a
folder of an --adapter-source (the tenant's own first) loaded on first use, or a weighted mix. `Service`
(service.py) is an AdapterResolution: these methods use its registry, engine, keys and sources. Loads (read,
validate, pack) run on the loading threads; a request whose adapter is in memory and packed never queues behind
them.
"""
from __future__ import annotations

import asyncio
import functools
import os

from .adapters.peft_format import AdapterError
from .adapters.registry import AdapterRef
from .adapters.source import AdapterSource
from .adapters.store import check_adapter_id
from .adapter_admin import BASE_MODEL_ID
from .service_errors import ModelNotFound, ServiceError
from .tenants import Tenant

LOAD_THREADS = max(4, min(16, os.cpu_count() or 1))  # adapter loads at once (each packs on the copy threads too)


class AdapterResolution:
    async def _resolve(self, tenant: Tenant, model: str) -> AdapterRef | None:
        if model in (BASE_MODEL_ID, self.base.name):
            return None
        try:
            if self._has_sources(tenant):  # another request loads it: wait here, not in a worker thread
                for pending in self.registry.loading(model) + self.registry.loading(tenant.stored_id(model)):
                    try:  # (it may be another namespace's adapter of that id: its outcome is not ours to report)
                        await asyncio.wrap_future(pending)
                    except Exception:  # noqa: BLE001 - resolved again below, in this tenant's namespace
                        pass
            ref = await asyncio.to_thread(self._resolve_ready, tenant, model)
            if ref is not None:
                return ref
            return await self._on_loading_threads(self._resolve_and_prepare, tenant, model)
        except AdapterError as e:
            if e.status == 404 or (e.status == 400 and not self._has_sources(tenant)):
                raise ModelNotFound(f"model {model!r} not found: use {BASE_MODEL_ID!r} or an uploaded adapter id")
            raise

    async def _on_loading_threads(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._loading, functools.partial(fn, *args))

    def _resolve_ready(self, tenant: Tenant, adapter_id: str) -> AdapterRef | None:
        """The adapter `model` names when its weights are in host memory and packed for loading (nothing to read or
        pack: no need to queue behind loads), else None (also for an id that is not valid: _resolve_id says why)."""
        try:
            check_adapter_id(adapter_id)
            record = self.registry.store.get(tenant.stored_id(adapter_id))
            ref = None
            if record is not None:
                ref = self.registry.resolve(record.id, cached_only=True)
            else:  # the first source holding the folder decides, as in _resolve_id
                for source, ref_id in self._sources_in_order(tenant, adapter_id):
                    if source.folder(adapter_id) is not None:
                        ref = self.registry.resolve_source(adapter_id, source, ref_id, cached_only=True)
                        break
        except AdapterError:
            return None
        return ref if ref is not None and self.engine.prepared(ref.weights) else None

    def _resolve_and_prepare(self, tenant: Tenant, adapter_id: str) -> AdapterRef:
        ref = self._resolve_id(tenant, adapter_id)
        self.engine.prepare_adapter(ref)  # pack for loading here, not on the engine thread
        return ref

    def _own_sources(self, tenant: Tenant) -> list[AdapterSource]:
        """The adapter sources the key file gives this tenant alone."""
        dirs = self.keys.sources_of(tenant) if self.keys is not None else ()
        if not dirs:
            return []
        found = self._tenant_sources.get(tenant.name)
        if found is None:
            found = self._tenant_sources[tenant.name] = [AdapterSource(d) for d in dirs]
        return found

    def _has_sources(self, tenant: Tenant) -> bool:
        return bool(self.sources) or bool(self._own_sources(tenant))

    def _sources_in_order(self, tenant: Tenant, adapter_id: str) -> list[tuple[AdapterSource, str]]:
        """(source, id its adapter is cached under): the tenant's own (key file) first, then --adapter-source ones."""
        return ([(s, tenant.stored_id(adapter_id)) for s in self._own_sources(tenant)] +
                [(s, adapter_id) for s in self.sources])

    def _resolve_id(self, tenant: Tenant, adapter_id: str) -> AdapterRef:
        """The tenant's stored adapter `adapter_id`, else the folder of that name in the first adapter source
        holding one (the tenant's own from the key file, then the --adapter-source ones), loaded on this first
        use. AdapterError: 404 when none has it; 400 for an id that could leave a source directory or a
        source folder that is not a valid adapter (naming it)."""
        try:
            check_adapter_id(adapter_id)
            return self.registry.resolve(tenant.stored_id(adapter_id))
        except AdapterError as e:
            if e.status not in (400, 404) or not self._has_sources(tenant):
                raise
        # a tenant's own source adapter is cached (and counted in metrics) under its stored-id form
        for source, ref_id in self._sources_in_order(tenant, adapter_id):
            ref = self.registry.resolve_source(adapter_id, source, ref_id)
            if ref is not None:
                return ref
        raise AdapterError(f"adapter {adapter_id!r} not found", 404)

    async def _resolve_mix(self, tenant: Tenant, model: str, adapters: list[tuple[str, float]]) -> AdapterRef:
        """A weighted mix of the tenant's adapters, each resolved in its namespace like a `model`."""
        if model not in (BASE_MODEL_ID, self.base.name):
            raise ServiceError(f"with adapters, model must be {BASE_MODEL_ID!r} (the mix is applied to the base "
                               f"model), got {model!r}")
        ids = [adapter_id for adapter_id, _ in adapters]
        if len(set(ids)) != len(ids):
            raise ServiceError(f"an adapter appears twice in the mix ({', '.join(ids)}): give each id once")
        for adapter_id in ids:
            try:
                check_adapter_id(adapter_id)
            except AdapterError:
                raise ModelNotFound(f"adapter {adapter_id!r} of the mix not found") from None
        return await self._on_loading_threads(self._mix_and_prepare, tenant, adapters)

    def _mix_and_prepare(self, tenant: Tenant, adapters: list[tuple[str, float]]) -> AdapterRef:
        members = []
        for adapter_id, weight in adapters:
            try:
                members.append((self._resolve_id(tenant, adapter_id), weight))
            except AdapterError as e:
                if e.status == 404 or (e.status == 400 and not self._has_sources(tenant)):
                    raise ModelNotFound(f"adapter {adapter_id!r} of the mix not found") from None
                raise
        ref = self.registry.mix(members)
        self.engine.prepare_adapter(ref)
        return ref
