//! The DSM address space: the registered regions laid end to end and cut
//! into 4 KiB pages numbered from 0.
//!
//! The page space is a guest address space in `vm-memory`'s terms: region
//! `k` starts at guest address `first_page * 4096` and is backed by the
//! caller's mapping ([`GuestMemoryMmap`] over raw, unowned
//! [`MmapRegion`]s), so a page's host address is vm-memory's
//! `get_host_address`. vm-memory has no reverse lookup, so host address →
//! page keeps an index of its own (`by_addr`). Both are a binary search over
//! the regions, as before: nothing is added to the fault path.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::uffd::PAGE_SIZE;

/// One registered region of memory (e.g. a guest RAM block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// A name that is the same on every node (e.g. QEMU's RAM block id).
    pub name: String,
    /// Host virtual address of the first byte.
    pub base: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
    /// DSM page number of the first page.
    pub first_page: u64,
}

/// The ordered list of regions.
#[derive(Debug, Clone)]
pub struct AddressSpace {
    regions: Vec<Region>,
    /// The page space: page `p` at guest address `p * 4096`.
    memory: GuestMemoryMmap,
    /// Indices of `regions` sorted by `base`, for address lookups.
    by_addr: Vec<usize>,
    pages: u64,
}

impl Default for AddressSpace {
    fn default() -> Self {
        AddressSpace {
            regions: Vec::new(),
            memory: GuestMemoryMmap::new(),
            by_addr: Vec::new(),
            pages: 0,
        }
    }
}

/// A region that cannot be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpaceError {
    /// Not page aligned.
    #[error("region {name} at {base:#x}+{len:#x} is not 4 KiB aligned")]
    Unaligned {
        /// Name.
        name: String,
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
    /// Overlaps another.
    #[error("region {name} overlaps region {other}")]
    Overlap {
        /// Name.
        name: String,
        /// The other region.
        other: String,
    },
    /// Empty.
    #[error("region {0} is empty")]
    Empty(String),
    /// vm-memory refused the region.
    #[error("region {name}: {reason}")]
    Memory {
        /// Name.
        name: String,
        /// vm-memory's reason.
        reason: String,
    },
}

/// Guest address of page `page` in the page space.
fn page_addr(page: u64) -> GuestAddress {
    GuestAddress(page * PAGE_SIZE as u64)
}

impl AddressSpace {
    /// Appends a region; returns its first page number. `base..base+len`
    /// must be memory the caller hands to the DSM (an anonymous private
    /// mapping, DESIGN.md §3) for as long as this space is used.
    pub fn add(&mut self, name: &str, base: u64, len: u64) -> Result<u64, SpaceError> {
        let mask = PAGE_SIZE as u64 - 1;
        if base & mask != 0 || len & mask != 0 {
            return Err(SpaceError::Unaligned {
                name: name.into(),
                base,
                len,
            });
        }
        if len == 0 {
            return Err(SpaceError::Empty(name.into()));
        }
        if let Some(o) = self
            .regions
            .iter()
            .find(|r| base < r.base + r.len && r.base < base + len)
        {
            return Err(SpaceError::Overlap {
                name: name.into(),
                other: o.name.clone(),
            });
        }
        let refused = |reason: String| SpaceError::Memory {
            name: name.into(),
            reason,
        };
        let first_page = self.pages;
        // SAFETY: the region is memory the caller handed to the DSM (see
        // above); the MmapRegion does not own it (it is never unmapped
        // here), and vm-memory only records the address, protection and
        // flags.
        let mapping = unsafe {
            MmapRegion::build_raw(
                base as *mut u8,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .map_err(|e| refused(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, page_addr(first_page))
            .ok_or_else(|| refused("does not fit the page space".into()))?;
        self.memory = self
            .memory
            .insert_region(Arc::new(region))
            .map_err(|e| refused(e.to_string()))?;
        self.regions.push(Region {
            name: name.into(),
            base,
            len,
            first_page,
        });
        self.pages += len / PAGE_SIZE as u64;
        self.by_addr = (0..self.regions.len()).collect();
        let regions = &self.regions;
        self.by_addr.sort_by_key(|&i| regions[i].base);
        Ok(first_page)
    }

    /// Total pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The regions in registration order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Page number of a host address, if it is in a region.
    pub fn page_of(&self, addr: u64) -> Option<u64> {
        let i = self
            .by_addr
            .partition_point(|&i| self.regions[i].base <= addr);
        let r = &self.regions[*self.by_addr.get(i.checked_sub(1)?)?];
        (addr < r.base + r.len).then(|| r.first_page + (addr - r.base) / PAGE_SIZE as u64)
    }

    /// The region holding host address `addr`, and `addr`'s offset in it.
    pub fn region_of(&self, addr: u64) -> Option<(&Region, u64)> {
        let page = self.page_of(addr)?;
        let i = self.regions.partition_point(|r| r.first_page <= page) - 1;
        let r = &self.regions[i];
        Some((r, addr - r.base))
    }

    /// Host address of a page. `page` must be below [`AddressSpace::pages`]
    /// (every caller takes it from a fault or a checked message).
    pub fn addr_of(&self, page: u64) -> u64 {
        self.memory
            .get_host_address(page_addr(page))
            .expect("a page of the registered regions") as u64
    }

    /// Whether pages `a` and `b` are in the same region.
    pub fn same_region(&self, a: u64, b: u64) -> bool {
        match (
            self.memory.find_region(page_addr(a)),
            self.memory.find_region(page_addr(b)),
        ) {
            (Some(ra), Some(rb)) => std::ptr::eq(ra, rb),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_number_regions_end_to_end() {
        let mut s = AddressSpace::default();
        assert_eq!(s.add("ram", 0x10_0000, 0x4000), Ok(0));
        assert_eq!(s.add("rom", 0x1000, 0x2000), Ok(4));
        assert_eq!(s.pages(), 6);
        assert_eq!(s.page_of(0x10_1fff), Some(1));
        assert_eq!(s.page_of(0x2000), Some(5));
        assert_eq!(s.page_of(0x3000), None);
        assert_eq!(s.page_of(0x10_4000), None);
        assert_eq!(s.addr_of(5), 0x2000);
        assert_eq!(s.addr_of(3), 0x10_3000);
        assert!(s.same_region(0, 3));
        assert!(!s.same_region(3, 4));
        let named = |addr| s.region_of(addr).map(|(r, off)| (r.name.as_str(), off));
        assert_eq!(named(0x10_1abc), Some(("ram", 0x1abc)));
        assert_eq!(named(0x2fff), Some(("rom", 0x1fff)));
        assert_eq!(named(0x3000), None);
        assert!(matches!(
            s.add("x", 0x10_2000, 0x1000),
            Err(SpaceError::Overlap { .. })
        ));
        assert!(matches!(
            s.add("y", 0x10, 0x1000),
            Err(SpaceError::Unaligned { .. })
        ));
    }
}
