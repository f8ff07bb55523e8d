"""Acting on links over rtnetlink (pyroute2): what reading sysfs cannot do.

Kept apart from `hal.net` (which only reads files) so that the pure renderer, which takes
`hal.net.Nic` as its input type, never reaches netlink.
"""

from __future__ import annotations


def rename_link(name: str, new_name: str) -> None:
    """Rename a link over netlink; the kernel refuses while the link is up.

    pyroute2 is imported here, not at module level: only the boot-time configure step
    renames, and only when the names are not already right.
    """
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=name) or (None,)
        if index is None:
            raise FileNotFoundError(f"no link named {name}")
        ipr.link("set", index=index, ifname=new_name)


def addresses() -> dict[str, list[str]]:
    """Interface name -> its addresses with prefix length, from the kernel (netlink)."""
    from pyroute2 import IPRoute

    out: dict[str, list[str]] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in ipr.get_addr():
            name = names.get(addr["index"])
            local = addr.get_attr("IFA_ADDRESS")
            if name and local:
                out.setdefault(name, []).append(f"{local}/{addr['prefixlen']}")
    return out
