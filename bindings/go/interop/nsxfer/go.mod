module github.com/meshvpn/libmeshvpn/bindings/go/interop/nsxfer

go 1.24
