"""File-based rollbacks: code (git repositories: coderepo, worktree, inplace, publish) and
configuration (configfiles, configedit), on the backup folders of `folders`."""
