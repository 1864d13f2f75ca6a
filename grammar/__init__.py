"""The Lark grammar of the polykv language; installed as ``polykv.grammar`` so wheels carry it."""
