"""The rows of running requests, kept from step to step, with their block tables on the device.

The shape of vLLM v1's InputBatch. A request keeps a row (a slot) while it runs. Its block table at
every cache layer it writes lives in one persistent tensor [num_cache_layers, rows, max_blocks] on the
device, written only where a row's context reached blocks not written yet (a re-allocated
request, after a preemption, is rewritten whole). Each step the scheduled requests are arranged to
fill slots 0..B-1 grouped by exit, deepest first, the order the model needs; a request already inside
its group's range stays put and only the others move in, so a step moves the rows that joined, left
or changed group, not every row. The model reads a view of the tensor's first B rows: nothing of size
rows x context is built or copied per step. Entries past a row's blocks, and at the cache layers its
exit skips, hold ``null_block``: the eager forward never reads them; a CUDA-graph step computes
rows at layers they skip and must write those keys and values somewhere harmless (a scratch block).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from balcony_runtime.staging import to_device


@dataclass
class _Row:
    request_id: str
    exit_layer: int  # backbone layers it runs (its cache layers follow from it)
    blocks: list[int]  # the block manager's own block-major list (tables_of): a new object means re-allocated


class InputBatch:
    def __init__(
        self,
        cache_layers_of: Callable[[int], Sequence[int]],
        num_cache_layers: int,
        device: torch.device,
        rows: int = 16,
        blocks: int = 16,
        null_block: int = 0,
        numpy_writes: bool | None = None,
    ):
        self.cache_layers_of = cache_layers_of  # exit -> cache layers, in the block manager's order
        self.device = device
        self.slots: list[_Row | None] = [None] * rows  # slot -> the request holding it
        self.slot_of: dict[str, int] = {}  # request id -> its slot
        self.written = np.zeros(rows, dtype=np.int64)  # [rows] blocks per layer already in block_table
        self.null_block = null_block  # what entries past a row's blocks and at skipped layers hold
        # New block ids written through numpy views of the tables (a CPU device's tensors are host
        # memory); else with torch's indexed writes, their indices staged to the device.
        self.numpy_writes = device.type == "cpu" if numpy_writes is None else numpy_writes
        self.block_table = torch.full((num_cache_layers, rows, blocks), null_block, dtype=torch.int32, device=device)
        # [C, rows] each row's last written block at every layer (block_table[:, b, written[b] - 1]):
        # a decode step's token is written there. Read as one contiguous slice, where gathering it from
        # block_table touched one scattered entry per row and layer of a table that outgrows the caches.
        self.last_block = torch.full((num_cache_layers, rows), null_block, dtype=torch.int32, device=device)
        self._last_exact = False  # after update_blocks: every row's last written block is the last it reads
        self._layers: dict[int, np.ndarray] = {}  # exit -> cache layers, as flat offsets into block_table
        self._layer_rows: dict[int, np.ndarray] = {}  # exit -> cache layers, [L, 1] (_layer_index)
        # The exits of the rows a mixed-exit plan grew, in order -> (their cache layers one after
        # another [N], each entry's row among them [N]) (write_grown; few distinct ones recur).
        self._grown_layers: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._last_ids: list[str] = []  # the request ids of the last arrangement, in slot order
        # The last arrange()'s arguments' ids (the scheduler's order) and the order it returned:
        # while the scheduler lists the same requests in the same order, they stay where they are.
        self._last_request_ids: list[str] | None = None
        self._last_order: list[int] = []
        self._unchanged = False  # the last arrange() found the same requests as the one before
        # The views view(), last_blocks() and last_block_ids() made, by shape, and the tables as numpy
        # arrays (numpy_writes): a torch slice costs several microseconds of a step whose rows and
        # widths rarely change; dropped when the tables are replaced (_grow_slots, _grow_blocks).
        self._views: dict[tuple[int, int], torch.Tensor | np.ndarray] = {}
        self._numpy_tables: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def arrangement(self) -> list[str]:
        """The request ids in slots 0..B-1 after the last arrange(): the same list object for as
        long as the arrangement stays the same (a new one whenever a request joins, leaves or moves)."""
        return self._last_ids

    def remove(self, request_id: str) -> None:
        """Free a finished or aborted request's slot (its row is zeroed when the slot is reused)."""
        slot = self.slot_of.pop(request_id, None)
        if slot is not None:
            self.slots[slot] = None
            self._last_ids = []
            self._last_request_ids = None

    # ---- one step --------------------------------------------------------------------------

    def arrange(self, request_ids: list[str], exits: list[int], tables: list[list[int]]) -> list[int]:
        """Place the step's requests in slots 0..B-1, each inside its exit group; returns ``order``:
        order[b] is the index (into the arguments) of the request in slot b.

        ``exits`` must be non-increasing (the scheduler's order), so group g spans the same index
        range in the arguments and in the slots."""
        if request_ids == self._last_request_ids or request_ids == self._last_ids:
            # The same requests listed as last step (or listed in their slots' order): they stay in
            # the same slots. None of them can have been re-allocated since (a preempted request
            # misses at least the step that evicted it, which changes the ids), so update_blocks
            # may skip its check for that.
            self._unchanged = True
            if request_ids != self._last_request_ids:  # listed in slot order: each sits where listed
                self._last_request_ids, self._last_order = request_ids, list(range(len(request_ids)))
            return self._last_order
        self._unchanged = False
        n = len(request_ids)
        self._reserve_slots(n)
        target: list[int | None] = [None] * n  # slot -> argument index
        unplaced: dict[int, list[int]] = {}  # exit -> argument indices that must move in
        for i in range(n):
            slot = self.slot_of.get(request_ids[i])
            if slot is not None and slot < n and exits[slot] == exits[i]:  # already inside its group
                target[slot] = i
            else:
                unplaced.setdefault(exits[i], []).append(i)
        for slot in range(n):
            if target[slot] is None:
                target[slot] = unplaced[exits[slot]].pop(0)

        old = list(self.slots)
        staying = set(request_ids)
        src, dst, fresh = [], [], []
        vacated = []  # slots at or past n left by requests moving in: homes for displaced rows
        for slot, i in enumerate(target):
            rid = request_ids[i]
            was = self.slot_of.get(rid)
            if was == slot:
                continue
            if was is None:
                fresh.append(slot)
            else:
                src.append(was)
                dst.append(slot)
                if was >= n:
                    vacated.append(was)
        # Requests in slots 0..n-1 that do not run this step (depth-limited, preempted) move out.
        displaced = [s for s in range(n) if old[s] is not None and old[s].request_id not in staying]
        if displaced:
            vacated += [s for s in range(n, self.num_slots) if old[s] is None]
            while len(vacated) < len(displaced):
                first = self._grow_slots()
                vacated += range(first, self.num_slots)
                old += [None] * (self.num_slots - first)
            for s, home in zip(displaced, vacated):
                src.append(s)
                dst.append(home)

        if src:
            for s, d in zip(src, dst):
                self.slots[d] = old[s]
                self.slot_of[old[s].request_id] = d
            for s in set(src) - set(dst):
                self.slots[s] = None
            src_t, dst_t = to_device(src, torch.long, self.device), to_device(dst, torch.long, self.device)
            self.block_table[:, dst_t] = self.block_table[:, src_t]  # [C, moved, W]; the right side is read first
            self.last_block[:, dst_t] = self.last_block[:, src_t]  # [C, moved]
            self.written[dst] = self.written[src]
        for slot in fresh:
            i = target[slot]
            self.slots[slot] = _Row(request_ids[i], exits[i], tables[i])
            self.slot_of[request_ids[i]] = slot
        self._zero(fresh)
        self._last_ids = [request_ids[i] for i in target]
        self._last_request_ids, self._last_order = request_ids, target  # type: ignore[assignment]
        return target  # type: ignore[return-value]

    def update_blocks(self, tables: list[list[int]], needed: np.ndarray, most: int | None = None) -> int:
        """Write the blocks each of slots 0..B-1 reads this step (``needed``[B] per layer, from its
        first) and did not have in block_table; ``tables`` in slot order (the block manager's
        block-major lists, BlockManager.tables_of, each at least that long). Returns the most
        blocks any of these rows reads (``most``: that number, when the caller knows it).

        A row's blocks are written as its context reaches them, not as they are allocated (a
        prefill chunk's or a prefix's blocks may come earlier): the check is one comparison of
        arrays, where counting every row's blocks was a Python pass over the rows each step."""
        n = len(tables)
        if not self._unchanged:
            rows = self.slots
            reset = [b for b in range(n) if tables[b] is not rows[b].blocks]  # re-allocated after a preemption
            for b in reset:
                rows[b].blocks = tables[b]
            self._zero(reset)
        if most is None:
            most = int(needed.max()) if n else 0
        if most > self.block_table.shape[2]:
            self._grow_blocks(most)
        written = self.written[:n]
        grow = (needed > written).nonzero()[0]
        if grow.size:
            self._write(grow, needed, tables)
        # (a row's context only grows, so written == needed unless its blocks were read further back)
        self._last_exact = not np.count_nonzero(written != needed)
        return most

    def write_grown(self, rows: np.ndarray, ids: np.ndarray, exit_layer: int | None, most: int,
                    row_exits: tuple[int, ...] = ()) -> int | None:
        """update_blocks for a steady decode step that knows which rows reach a new block and the
        block each took (scheduler.GrownBlocks: ``rows`` [G] slots among 0..B-1, each one token past
        the last step; ``ids`` [G, L] at ``exit_layer``'s cache layers when every row runs at that
        exit, or, ``exit_layer`` None, [N]: each row's ids at the cache layers of its exit in
        ``row_exits`` in turn): written as given, with no comparison of counts. ``most``: the most
        blocks any row reads. None, nothing written, unless every row's last written block was the
        last it read in the last step: then the rows whose context crosses into a new block are
        exactly these (the plan's promise), each needing the one block it took."""
        if not self._last_exact:
            return None
        if most > self.block_table.shape[2]:
            self._grow_blocks(most)
        if len(rows):
            old = self.written[rows]  # [G] each row's new block's index
            if exit_layer is not None:  # broadcast: [L, 1] layers against [G] rows
                layers, slots, blocks, values = self._layer_index(exit_layer), rows, old, ids.T  # values [L, G]
            else:  # one entry per (row, layer of its exit): [N] each
                layers, entry_row = self._grown_layers_of(row_exits)
                slots, blocks, values = rows[entry_row], old[entry_row], ids
            if self.numpy_writes:
                table, last_block = self._host_tables()  # [C, slots, width], [C, slots]
                table[layers, slots, blocks] = values
                last_block[layers, slots] = values
            else:
                device = self.device
                layers_t, slots_t = to_device(layers, torch.long, device), to_device(slots, torch.long, device)
                values_t = to_device(values, torch.int32, device)
                self.block_table[layers_t, slots_t, to_device(blocks, torch.long, device)] = values_t
                self.last_block[layers_t, slots_t] = values_t
            self.written[rows] = old + 1
        return most

    def last_blocks(self, num_rows: int) -> torch.Tensor | None:
        """The block each of slots 0..num_rows-1 reads last this step, at every cache layer: [C,
        num_rows], a view (``null_block`` at layers a row skips); None when some row read fewer blocks
        than it has written (the caller then looks its blocks up in the table)."""
        return self._view(num_rows, -1) if self._last_exact else None

    def last_block_ids(self, num_rows: int) -> np.ndarray:
        """last_blocks(num_rows) as a numpy array sharing its memory (host tables only; the caller
        has checked that last_blocks is not None)."""
        return self._view(num_rows, -2)

    def view(self, num_rows: int, num_blocks: int) -> torch.Tensor:
        """The block tables of slots 0..num_rows-1: [C, num_rows, num_blocks], a view (no copy)."""
        return self._view(num_rows, num_blocks)

    # ---- internals -------------------------------------------------------------------------

    def _view(self, num_rows: int, num_blocks: int) -> torch.Tensor | np.ndarray:
        """block_table[:, :num_rows, :num_blocks]; for num_blocks -1 last_block[:, :num_rows], for -2
        the same as a numpy array (host tables). Made once per shape while the tables stay the same."""
        views = self._views
        view = views.get((num_rows, num_blocks))
        if view is None:
            if len(views) > 64:  # (shapes of past steps: keep a few, not every one ever seen)
                views.clear()
            if num_blocks >= 0:
                view = self.block_table[:, :num_rows, :num_blocks]
            elif num_blocks == -1:
                view = self.last_block[:, :num_rows]
            else:
                view = self._host_tables()[1][:, :num_rows]
            views[num_rows, num_blocks] = view
        return view

    def _tables_replaced(self) -> None:
        self._views.clear()
        self._numpy_tables = None
        self._layers.clear()

    def _write(self, grow: np.ndarray, upto: np.ndarray, tables: list[list[int]]) -> None:
        """Copy block ids written[b]:upto[b] of rows b in ``grow`` into block_table, and each one's
        last into last_block, with one indexed write each."""
        _, slots, width = self.block_table.shape
        slot_rows, layer_offsets = self.slots, self._layer_offsets
        old_of, new_of = self.written[grow], upto[grow]  # [G]
        if self.numpy_writes and self._write_crossed(grow, old_of, new_of, tables):
            return
        crossed = new_of == old_of + 1  # [G] decoding rows that reached their next block: one id per layer
        values: list[int] = []  # the new block ids, in the order of `index`
        index: list[np.ndarray] = []  # where each goes in block_table.view(-1)
        last: list[np.ndarray] = []  # where in `values` each grown row's new last block per layer is
        if crossed.any():  # most steps' only rows: their ids are their last blocks too
            rows, olds = grow[crossed], old_of[crossed]  # [R]
            exits = []
            for b, old in zip(rows.tolist(), olds.tolist()):
                exit_layer = slot_rows[b].exit_layer
                exits.append(exit_layer)
                n = len(layer_offsets(exit_layer))
                values += tables[b][old * n:(old + 1) * n]  # block `old` of every layer (block-major)
            base = rows * width + olds  # [R] each row's block `old` in layer 0
            if len(set(exits)) == 1:  # one exit: the same layers for every row, [R, L] in values' order
                index.append((base[:, None] + layer_offsets(exits[0])[None, :]).ravel())
            else:
                offsets = [layer_offsets(e) for e in exits]  # [L_b] each
                index.append(np.concatenate(offsets) + np.repeat(base, [len(o) for o in offsets]))
            last.append(np.arange(len(values)))
        if not crossed.all():
            for b, old, new in zip(grow[~crossed].tolist(), old_of[~crossed].tolist(), new_of[~crossed].tolist()):
                layers = layer_offsets(slot_rows[b].exit_layer)  # [L_b]
                n, first = len(layers), len(values)
                values += tables[b][old * n:new * n]  # [new - old, L_b] block-major
                index.append(((b * width + np.arange(old, new))[:, None] + layers[None, :]).ravel())  # [k * L_b]
                last.append(np.arange(first + (new - old - 1) * n, first + (new - old) * n))  # [L_b] block new - 1's
        self.written[grow] = new_of
        # [N] into block_table.view(-1): layer * slots * width + slot * width + block
        flat = np.concatenate(index) if len(index) > 1 else index[0]
        at = np.concatenate(last) if len(last) > 1 else last[0]  # [M] where each new last block sits in values
        ids = np.array(values, dtype=np.int32)  # [N]
        last_ids, last_flat = (ids[at], flat[at]) if len(at) < len(values) else (ids, flat)  # [M]
        last_flat = last_flat // width  # [M] into last_block.view(-1): layer * slots + slot
        if self.numpy_writes:
            # The tensors are host memory: numpy writes them in place, several times faster than
            # torch's indexed writes for a few hundred ids (this runs in every step a row crosses
            # into a new block, about one row in block_size of them).
            table, last_block = self._host_tables()
            table.reshape(-1)[flat] = ids
            last_block.reshape(-1)[last_flat] = last_ids
            return
        device = self.device
        self.block_table.view(-1)[to_device(flat, torch.long, device)] = to_device(ids, torch.int32, device)
        self.last_block.view(-1)[to_device(last_flat, torch.long, device)] = to_device(last_ids, torch.int32, device)

    def _write_crossed(self, grow: np.ndarray, old_of: np.ndarray, new_of: np.ndarray,
                       tables: list[list[int]]) -> bool:
        """_write's common case through numpy views: every row in ``grow`` reached its next block
        (a decode step) and all run at one exit. Each row's new ids are one slice of its
        block-major list; two broadcast writes place them, where the general path builds flat
        indices first (a dozen more array calls). False, nothing written, otherwise."""
        if np.count_nonzero(new_of - old_of != 1):
            return False
        rows, slot_rows = grow.tolist(), self.slots
        exit_layer = slot_rows[rows[0]].exit_layer
        if any(slot_rows[b].exit_layer != exit_layer for b in rows):
            return False
        layers = self._layer_index(exit_layer)  # [L, 1]
        n = layers.shape[0]
        values: list[int] = []
        for b, old in zip(rows, old_of.tolist()):
            values += tables[b][old * n:(old + 1) * n]  # block `old` of every layer (block-major)
        ids = np.array(values, dtype=np.int32).reshape(len(rows), n).T  # [L, R]
        table, last_block = self._host_tables()  # [C, slots, width], [C, slots]
        table[layers, grow, old_of] = ids
        last_block[layers, grow] = ids
        self.written[grow] = new_of
        return True

    def _host_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """block_table and last_block as numpy arrays sharing their memory (numpy_writes: host tensors)."""
        if self._numpy_tables is None:
            self._numpy_tables = self.block_table.numpy(), self.last_block.numpy()
        return self._numpy_tables

    def _layer_index(self, exit_layer: int) -> np.ndarray:
        """An exit's cache layers as an [L, 1] index (broadcast against rows)."""
        index = self._layer_rows.get(exit_layer)
        if index is None:
            index = self._layer_rows[exit_layer] = np.asarray(self.cache_layers_of(exit_layer), dtype=np.int64)[:, None]
        return index

    def _grown_layers_of(self, row_exits: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """For rows at these exits: their cache layers one row after another [N], and the row (index
        into row_exits) of each [N]."""
        found = self._grown_layers.get(row_exits)
        if found is None:
            per_row = [self._layer_index(e)[:, 0] for e in row_exits]
            found = (np.concatenate(per_row),
                     np.repeat(np.arange(len(row_exits)), [len(layers) for layers in per_row]))
            if len(self._grown_layers) >= 4096:  # (bounded: rows' exits could combine without end)
                self._grown_layers.clear()
            self._grown_layers[row_exits] = found
        return found

    def _layer_offsets(self, exit_layer: int) -> np.ndarray:
        """Flat offsets of an exit's cache layers in block_table: layer * rows * width."""
        if exit_layer not in self._layers:
            _, slots, width = self.block_table.shape
            self._layers[exit_layer] = self._layer_index(exit_layer)[:, 0] * (slots * width)
        return self._layers[exit_layer]

    def _zero(self, slots: list[int]) -> None:
        if slots:
            slots_t = to_device(slots, torch.long, self.device)
            self.block_table[:, slots_t] = self.null_block
            self.last_block[:, slots_t] = self.null_block
            self.written[slots] = 0

    def reserve(self, rows: int, blocks: int) -> None:
        """Size the tables for ``rows`` slots of ``blocks`` blocks now, so that a batch of at most
        that many never replaces them: a reader holding a view of block_table (decode graphs'
        static buffer) keeps reading the live tables."""
        self._reserve_slots(rows)
        if blocks > self.block_table.shape[2]:
            self._grow_blocks(blocks)

    def _reserve_slots(self, n: int) -> None:
        while self.num_slots < n:
            self._grow_slots()

    def _grow_slots(self) -> int:
        """Double the slots; returns the first new one."""
        first = self.num_slots
        grown = torch.full((self.block_table.shape[0], 2 * first, self.block_table.shape[2]), self.null_block,
                           dtype=torch.int32, device=self.device)
        grown[:, :first] = self.block_table
        self.block_table = grown
        last = torch.full((grown.shape[0], 2 * first), self.null_block, dtype=torch.int32, device=self.device)
        last[:, :first] = self.last_block
        self.last_block = last
        self.slots += [None] * first
        self.written = np.concatenate([self.written, np.zeros(first, dtype=np.int64)])
        self._tables_replaced()
        return first

    def _grow_blocks(self, at_least: int) -> None:
        width = self.block_table.shape[2]
        while width < at_least:
            width *= 2
        grown = torch.full((*self.block_table.shape[:2], width), self.null_block, dtype=torch.int32, device=self.device)
        grown[:, :, : self.block_table.shape[2]] = self.block_table
        self.block_table = grown
        self._tables_replaced()
